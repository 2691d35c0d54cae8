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


def class_data(data):
    """``protocol["data"]`` as ``{class: summary}``; a per-class run's combined protocol holds
    each class's own ``{class: summary}`` under its class (tools/train_per_class.py)."""
    out = {}
    for cls, d in (data or {}).items():
        inner = d.get(cls) if isinstance(d, dict) else None
        out[cls] = inner if isinstance(inner, dict) and "test" not in d else d
    return out


def data_total(data):
    """The per-class data summary (``protocol["data"]``) over all classes: counts summed, one
    fingerprint of the per-class ones, every skipped file (``class: split: name``)."""
    import hashlib

    data = class_data(data)
    joined = "\n".join(f"{c}:{data[c].get('test_files')}" for c in sorted(data))
    return {"train": sum(int(d.get("train") or 0) for d in data.values()),
            "test": sum(int(d.get("test") or 0) for d in data.values()),
            "test_files": hashlib.sha256(joined.encode("utf-8")).hexdigest()[:12],
            "skipped": [f"{c}: {f}" for c in sorted(data) for f in data[c].get("skipped") or []]}


def data_cell(d):
    """``N train / M test images, test files <fingerprint>, K skipped``: one class's or the
    total."""
    return (f"{d.get('train')} train / {d.get('test')} test images, test files "
            f"{d.get('test_files')}, {len(d.get('skipped') or [])} skipped")


def data_section(protocol):
    """results.md's table of the data, per class, and every skipped file by name."""
    data = class_data(protocol.get("data"))
    if not data:
        return ""
    total = data_total(data)
    rows = [[c, d.get("train"), d.get("test"), d.get("test_files"), len(d.get("skipped") or [])]
            for c, d in data.items()]
    rows.append(["all", total["train"], total["test"], total["test_files"],
                 len(total["skipped"])])
    table = tabulate(rows, headers=["class", "train images", "test images",
                                    "test files (fingerprint)", "skipped"],
                     tablefmt="github", disable_numparse=True)
    skipped = "".join(f"- {f}\n" for f in total["skipped"])
    return ("Data (test files: a fingerprint of the test images' names relative to their data "
            "root and byte sizes):\n\n" + table + "\n\n" +
            (f"Left out by dataset.on_bad_file: skip (the reasons are in log.txt):\n\n"
             f"{skipped}\n"
             if skipped else ""))


def protocol_line(protocol, departures=True):
    """One line; ``departures=False`` leaves them for ``departure_lines``; the data as their
    total (``data_section`` gives them per class)."""
    p = dict(protocol)
    classes = p.pop("classes", [])
    if not departures:
        p.pop("departures", None)
    if p.get("data"):
        p["data"] = f"({data_cell(data_total(p['data']))})"
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


def _count(k, n):
    return "n/a" if k is None or not n else f"{k} / {n} ({100.0 * k / n:.2f}%)"


def operating_point_table(results, fmt="github"):
    """What each class's image threshold does on the test set: false rejects (good images
    rejected) and escapes (bad images passed), with counts; '' without an operating point."""
    points = results.get("operating_point") or {}
    if not points:
        return ""
    rows = [[c, p.get("rule") or "n/a", _count(p.get("false_rejects"), p.get("good")),
             _count(p.get("escapes"), p.get("bad"))] for c, p in points.items()]
    if len(points) > 1:
        total = [sum(p.get(k) or 0 for p in points.values()) for k in
                 ("false_rejects", "good", "escapes", "bad")]
        rows.append(["all", "", _count(*total[:2]), _count(*total[2:])])
    return ("\n\nOperating point at each class's image threshold, on the test set:\n\n" +
            tabulate(rows, headers=["class", "threshold rule", "false rejects (good)",
                                    "escapes (bad)"], tablefmt=fmt, disable_numparse=True))


def availability_lines(protocol):
    """What the figures cannot say (no masks, no anomalies) and the key metric used."""
    out = []
    if protocol.get("no_masks"):
        out.append(f"Pixel metrics are not available for {', '.join(protocol['no_masks'])}: "
                   f"no masks (their anomalous test images have none); their pixel "
                   f"thresholds come from good images only.")
    for cls, text in (protocol.get("partial_masks") or {}).items():
        out.append(f"{cls}: {text}.")
    if protocol.get("no_anomalies"):
        out.append(f"No anomalous test images for {', '.join(protocol['no_anomalies'])}: "
                   f"their ranking metrics are not available.")
    if protocol.get("key_metric"):
        out.append(f"Key metric: {protocol['key_metric']}.")
    return out


def _results_md(results):
    protocol = results["protocol"]
    lines = departure_lines(protocol)
    departures = (f"{departures_heading(protocol)}\n\n" + "\n".join(lines) +
                  "\n\n") if lines else ""
    notes = "".join(f"{line}\n\n" for line in availability_lines(protocol))
    return (f"# Results\n\n{protocol_line(protocol, departures=False)}\n\n{departures}"
            f"{data_section(protocol)}{notes}{results_table(results)}"
            f"{operating_point_table(results)}\n")


def write_results(results, work_dir):
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=2)),
                       ("results.md", _results_md(results))):
        tmp = work_dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, work_dir / name)
