"""Gather the ``results.json`` of any runs into one comparison table.

    python tools/collect_results.py RUN [RUN ...]          # run folders or results.json files
    python tools/collect_results.py DIR                    # everything under DIR
    python tools/collect_results.py A B --per_class --out cmp   # cmp.md, cmp.csv, cmp.json

Every folder argument is searched recursively for ``results.json``: a run folder gives its own
result and those of its ``evaluations/<x>/``, a per-class run (``tools/train_per_class.py``) its
combined result and each class's, a sweep (``tools/sweep.py``) each cell's; ``--no_recurse``
takes only the ``results.json`` directly in each folder. Each row is labelled with the file's
folder relative to the argument (``.`` for the argument itself), prefixed by the argument when
several are given.

Protocol keys whose values differ between the rows (a key missing from some rows counts as
differing) become columns; the shared ones are printed once as the protocol line. Rows hold
the mean over classes (``--per_class``: also one row per class). Markdown shows metrics in %
(two decimals, ``n/a`` for undefined); CSV and JSON keep the stored fractions (empty / null).
The figures are the reported ones (the final epoch or the evaluated checkpoint), never a
``best_on_test_set`` entry. Without ``--out`` the markdown is printed (``--format csv|json`` prints those instead).

Exit status 2, with the file named, when an argument does not exist, holds no results.json, or
a results.json is not valid JSON or lacks ``protocol`` / ``per_class`` / ``mean``.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = "results.json"
SKIP_DIRS = {".git", "__pycache__", "checkpoints", "events", "vis", "plots"}
METRIC_ORDER = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
                "pixel_f1max", "pixel_aupro", "mad"]


class InputError(Exception):
    """Bad input: reported on stderr with exit status 2."""


def find_results(arg, recurse=True):
    """``results.json`` files of one argument, in a stable (sorted path) order."""
    path = Path(arg)
    if not path.exists():
        raise InputError(f"{arg}: no such file or folder")
    if path.is_file():
        if path.name != RESULTS and path.suffix != ".json":
            raise InputError(f"{arg}: not a results.json file")
        return [path]
    if not recurse:
        found = [path / RESULTS] if (path / RESULTS).is_file() else []
    else:
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
            if RESULTS in files:
                found.append(Path(root) / RESULTS)
    if not found:
        where = "in" if not recurse else "under"
        raise InputError(f"{arg}: no {RESULTS} {where} this folder")
    return sorted(found, key=lambda p: p.parent.relative_to(path).parts)  # a run, then its own


def load_results(path):
    """The parsed file, checked for the parts the table needs; errors name the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: malformed results: a JSON object is expected, got "
                         f"{type(data).__name__}")
    missing = [k for k in ("protocol", "per_class", "mean") if k not in data]
    if missing:
        raise InputError(f"{path}: malformed results: missing {', '.join(missing)} (a "
                         f"results.json written by a DualMem run has protocol, per_class, mean)")
    for key in ("protocol", "per_class", "mean"):
        if not isinstance(data[key], dict):
            raise InputError(f"{path}: malformed results: '{key}' must be an object, got "
                             f"{type(data[key]).__name__}")
    for cls, values in list(data["per_class"].items()) + [("mean", data["mean"])]:
        if not isinstance(values, dict):
            raise InputError(f"{path}: malformed results: metrics of '{cls}' must be an object")
        for name, v in values.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise InputError(f"{path}: malformed results: {cls}.{name} = {v!r} is not a "
                                 f"number or null")
    return data


def _label(arg, path, several):
    if not Path(arg).is_dir():  # a results.json argument: its folder as given
        return Path(arg).parent.as_posix()
    rel = path.parent.relative_to(Path(arg)).as_posix()
    if not several:
        return rel
    base = Path(arg).as_posix().rstrip("/")
    return base if rel == "." else f"{base}/{rel}"


def _show(v, short=False):
    """A protocol value as one cell: lists compactly (``short``: long ones as their length and
    first items, objects as key=value pairs, so a seen-anomaly file list cannot swamp the
    table), otherwise nested objects as JSON."""
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        if all(not isinstance(x, (list, dict)) for x in v):
            if short and len(v) > 4:
                return f"{len(v)}: " + ",".join(str(x) for x in v[:3]) + ",..."
            return ",".join(str(x) for x in v)
        return json.dumps(v, separators=(",", ":"))
    if isinstance(v, dict):
        if short:  # e.g. seen_anomalies: "files=20: a.png,b.png,c.png,..., num_per_class=5"
            return ", ".join(f"{k}={_show(v[k], short=True)}" for k in sorted(v))
        return json.dumps(v, separators=(",", ":"), sort_keys=True)
    return str(v)


def _pct(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100.0 * v:.2f}"


def collect(args_paths, recurse=True, per_class=False):
    """The table: {"protocol": shared keys, "varying": [keys], "metrics": [names],
    "rows": [{"run", "file", "class", "protocol": {varying key: value}, metric: value...}]}."""
    several = len(args_paths) > 1
    entries = []
    for arg in args_paths:
        for path in find_results(arg, recurse):
            entries.append((_label(arg, path, several), path, load_results(path)))
    keys = list(dict.fromkeys(k for _, _, d in entries for k in d["protocol"]))
    varying = [k for k in keys
               if len({json.dumps(d["protocol"].get(k, None), sort_keys=True)
                       if k in d["protocol"] else "<missing>" for _, _, d in entries}) > 1]
    shared = {k: entries[0][2]["protocol"][k] for k in keys if k not in varying}
    found = list(dict.fromkeys(m for _, _, d in entries
                               for vals in [d["mean"], *d["per_class"].values()] for m in vals))
    metrics = [m for m in METRIC_ORDER if m in found] + [m for m in found
                                                          if m not in METRIC_ORDER]
    rows = []
    for label, path, d in entries:
        proto = {k: d["protocol"].get(k) for k in varying}  # None: the run lacks the key
        groups = ([(c, v) for c, v in d["per_class"].items()] if per_class else [])
        groups.append(("mean", d["mean"]))
        for cls, values in groups:
            rows.append({"run": label, "file": str(path), "class": cls, "protocol": proto,
                         **{m: values.get(m) for m in metrics}})
    return {"protocol": shared, "varying": varying, "metrics": metrics, "rows": rows}


def to_markdown(table, per_class=False):
    from tabulate import tabulate

    from utils.results import protocol_line

    headers = ["run"] + (["class"] if per_class else []) + table["varying"] + table["metrics"]
    body = []
    for r in table["rows"]:
        body.append([r["run"]] + ([r["class"]] if per_class else []) +
                    [_show(r["protocol"][k], short=True) for k in table["varying"]] +
                    [_pct(r[m]) for m in table["metrics"]])
    shared = dict(table["protocol"])
    line = protocol_line(shared) if shared else "protocol: nothing shared; metrics in %"
    differs = (f"differs between runs: {', '.join(table['varying'])}" if table["varying"]
               else "every run has the same protocol")
    what = "per class and mean over classes" if per_class else "mean over classes"
    n_runs = len(dict.fromkeys(r["file"] for r in table["rows"]))
    return "\n".join([f"# Results of {n_runs} run(s)", "", line, "", f"{differs}; {what}", "",
                      tabulate(body, headers=headers, tablefmt="github",
                               disable_numparse=True), ""])


def to_csv(table):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "class", *table["varying"], *table["metrics"], "file"])
    for r in table["rows"]:
        w.writerow([r["run"], r["class"]] +
                   ["" if r["protocol"][k] is None else _show(r["protocol"][k])
                    for k in table["varying"]] +
                   ["" if r[m] is None else repr(float(r[m])) for m in table["metrics"]] +
                   [r["file"]])
    return buf.getvalue()


def to_json(table):
    return json.dumps(table, indent=2) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_OR_DIR",
                   help="run folders, folders to search, or results.json files")
    p.add_argument("--out", metavar="PREFIX",
                   help="write PREFIX.md, PREFIX.csv and PREFIX.json instead of printing")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md",
                   help="what to print without --out (default md)")
    p.add_argument("--per_class", "--per-class", action="store_true",
                   help="one row per class as well as the mean")
    p.add_argument("--no_recurse", "--no-recurse", action="store_true",
                   help="only the results.json directly in each folder")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        table = collect(args.paths, recurse=not args.no_recurse, per_class=args.per_class)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    texts = {"md": to_markdown(table, args.per_class), "csv": to_csv(table),
             "json": to_json(table)}
    if not args.out:
        sys.stdout.write(texts[args.format])
        return 0
    prefix = Path(args.out)
    if prefix.parent and not prefix.parent.exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
    for ext, text in texts.items():
        path = prefix.parent / f"{prefix.name}.{ext}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
