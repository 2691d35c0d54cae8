"""Result tables that state their protocol: JSON for machines, markdown and log for people."""
import json
import math
import os
from pathlib import Path

from tabulate import tabulate



def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100.0 * v:.2f}"


def results_table(results, fmt="github"):
    per_class, mean = results["per_class"], results["mean"]
    metrics = [m for m in mean if m != "mad"] + (["mad"] if "mad" in mean else [])
    rows = [[cls] + [_fmt(per_class[cls].get(m)) for m in metrics] for cls in per_class]
    rows.append(["mean"] + [_fmt(mean.get(m)) for m in metrics])
    return tabulate(rows, headers=["class"] + metrics, tablefmt=fmt)


def protocol_line(protocol):
    p = dict(protocol)
    classes = p.pop("classes", [])
    parts = [f"{k}={v}" for k, v in p.items()]
    return f"protocol: {', '.join(parts)}, classes={len(classes)}; metrics in %"


def write_results(results, work_dir):
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=2)),
                       ("results.md", f"# Results\n\n{protocol_line(results['protocol'])}\n\n"
                                      f"{results_table(results)}\n")):
        tmp = work_dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, work_dir / name)
