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


def _show(value):
    """Mappings as ``{key: value; ...}`` (``departures`` reads as a list of sentences)."""
    if isinstance(value, dict):
        return "{" + "; ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return value


def protocol_line(protocol, departures=True):
    """One line; ``departures=False`` leaves them for ``departure_lines``."""
    p = dict(protocol)
    classes = p.pop("classes", [])
    if not departures:
        p.pop("departures", None)
    parts = [f"{k}={_show(v)}" for k, v in p.items()]
    return f"protocol: {', '.join(parts)}, classes={len(classes)}; metrics in %"


def departure_lines(protocol):
    """The config's departures from its paper, one ``- topic: text`` line each."""
    return [f"- {k}: {v}" for k, v in (protocol.get("departures") or {}).items()]


def departures_heading(protocol):
    """The sentences are the config file's: ``--opts`` may have changed what they describe."""
    return "Departures from the paper the config follows" + (
        " (as its file states them; the run's opts above come after)"
        if protocol.get("opts") else "") + ":"


def _results_md(results):
    protocol = results["protocol"]
    lines = departure_lines(protocol)
    departures = (f"{departures_heading(protocol)}\n\n" + "\n".join(lines) +
                  "\n\n") if lines else ""
    return (f"# Results\n\n{protocol_line(protocol, departures=False)}\n\n{departures}"
            f"{results_table(results)}\n")


def write_results(results, work_dir):
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=2)),
                       ("results.md", _results_md(results))):
        tmp = work_dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, work_dir / name)
