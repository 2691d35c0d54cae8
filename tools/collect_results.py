"""Gather the ``results.json`` of any runs into one comparison table.

    python tools/collect_results.py RUN [RUN ...]          # run folders or results.json files
    python tools/collect_results.py DIR                    # everything under DIR
    python tools/collect_results.py A B --per_class --out cmp   # cmp.md, cmp.csv, cmp.json

Every folder argument is searched recursively for ``results.json``: a run folder gives its own
result and those of its ``evaluations/<x>/``, a per-class run (``tools/train_per_class.py``) its
combined result and each class's, a sweep (``tools/sweep.py``) each cell's; ``--no_recurse``
takes only the ``results.json`` directly in each folder. Each row is labelled with the file's
folder relative to the folder holding every argument (``runs_dir``; ``.`` for that folder).

No absolute path is written: ``runs_dir`` is given relative to the output file's folder (the
current folder without ``--out``) when both lie in one project (git work tree), else by its
name; a row's ``file`` is its results.json seen from there. Absolute paths inside the protocol
(an older run's seen-anomaly files, a data root in ``opts``) become their data root's name and
the path below it, a path in the project becomes relative to the output, any other its name.

The data each row was measured on (``protocol.data``: train and test image counts, a
fingerprint of the test files, the skipped files) are columns of their own, per class or
summed for the mean; runs on other data (another copy, an image added) differ there.

Protocol keys whose values differ between the rows (a key missing from some rows counts as
differing) become columns; the shared ones are printed once as the protocol line. The config's
``departures`` from its paper (sentences, often a thousand characters) are never a column nor
in that line: a note under the table counts their distinct sets, ``--show_departures`` prints
them there, and the JSON keeps them whole (``departures``: each set with its runs). Rows hold
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
import re
import sys
from pathlib import Path

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

RESULTS = "results.json"
SKIP_DIRS = {".git", "__pycache__", "checkpoints", "events", "vis", "plots"}
from dualmem.utils.metrics import TABLE_METRICS as METRIC_ORDER  # noqa: E402  (the one list)


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
    summary = data["protocol"].get("data")
    if summary is not None and not (isinstance(summary, dict) and all(
            isinstance(v, dict) for v in summary.values())):
        raise InputError(f"{path}: malformed results: protocol.data must map each class to "
                         f"its counts, got {summary!r:.80}")
    for cls, values in list(data["per_class"].items()) + [("mean", data["mean"])]:
        if not isinstance(values, dict):
            raise InputError(f"{path}: malformed results: metrics of '{cls}' must be an object")
        for name, v in values.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise InputError(f"{path}: malformed results: {cls}.{name} = {v!r} is not a "
                                 f"number or null")
    return data


def _project(folder):
    """The git work tree holding ``folder``, else ``folder`` itself."""
    folder = Path(folder).resolve()
    for p in (folder, *folder.parents):
        if (p / ".git").exists():
            return p
    return folder


_ABS = re.compile(r"(?<![\w.~\\-])/[^\s'\",;()\[\]{}<>|]+")


class Paths:
    """How the table writes paths: ``runs_dir`` seen from the output's folder (relative when
    both are in one project, else its name), rows relative to ``runs_dir``, absolute paths in
    values by ``portable``."""

    def __init__(self, out_dir, runs_dir, classes=()):
        self.out_dir, self.runs_dir = Path(out_dir).resolve(), Path(runs_dir).resolve()
        self.project = _project(self.out_dir)
        self.classes = set(classes)
        self.shown_runs_dir = self.portable(str(self.runs_dir), data=False)

    def portable(self, path, data=True):
        """An absolute path without the machine: a data file as its root's name and the path
        below it (the root holds a folder named after a class), a path in the project relative
        to the output's folder, any other path by its name."""
        p = Path(path)
        parts = p.parts
        for i in range(len(parts) - 2, 1, -1) if data else ():
            if parts[i] in self.classes:  # the class folder; its parent is the data root
                return Path(*parts[i - 1:]).as_posix()
        if p.is_relative_to(self.project):
            return Path(os.path.relpath(p, self.out_dir)).as_posix()
        return p.name or "."

    def value(self, v):
        """``v`` with every absolute path in it (strings, lists, objects) made portable."""
        if isinstance(v, str):
            return _ABS.sub(lambda m: self.portable(m.group(0)), v)
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, dict):
            return {k: self.value(x) for k, x in v.items()}
        return v

    def row(self, path):
        """(label, file): the results.json's folder relative to ``runs_dir``, and the file seen
        from the output (``runs_dir`` as shown, then the label)."""
        rel = Path(os.path.relpath(Path(path).resolve().parent, self.runs_dir)).as_posix()
        file = Path(self.shown_runs_dir, rel, Path(path).name).as_posix()
        return rel, os.path.normpath(file).replace(os.sep, "/")


def runs_folder(args_paths):
    """The folder holding every argument (a results.json argument: its folder)."""
    folders = [str(Path(a).resolve() if Path(a).is_dir() else Path(a).resolve().parent)
               for a in args_paths]
    return Path(os.path.commonpath(folders))


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


def collect(args_paths, recurse=True, per_class=False, out_dir="."):
    """The table: {"runs_dir", "protocol": shared keys, "varying": [keys], "metrics": [names],
    "data": whether rows carry data, "rows": [{"run", "file", "class", "protocol": {varying
    key: value}, "data": {train, test, test_files, skipped} or None, metric: value...}]}.
    ``out_dir``: where the table is written (paths are given relative to it)."""
    from dualmem.utils.results import class_data, data_total

    entries = []
    for arg in args_paths:
        for path in find_results(arg, recurse):
            entries.append((path, load_results(path)))
    classes = {c for _, d in entries for c in d["protocol"].get("classes") or []}
    classes |= {c for _, d in entries for c in d["per_class"]}
    paths = Paths(out_dir, runs_folder(args_paths), classes)
    keys = [k for k in dict.fromkeys(k for _, d in entries for k in d["protocol"])
            if k != "departures"]  # sentences, not a column: see departure_sets
    varying = [k for k in keys
               if len({json.dumps(d["protocol"].get(k, None), sort_keys=True)
                       if k in d["protocol"] else "<missing>" for _, d in entries}) > 1]
    shared = {k: paths.value(entries[0][1]["protocol"][k]) for k in keys
              if k not in varying and k != "data"}
    found = list(dict.fromkeys(m for _, d in entries
                               for vals in [d["mean"], *d["per_class"].values()] for m in vals))
    metrics = [m for m in METRIC_ORDER if m in found] + [m for m in found
                                                          if m not in METRIC_ORDER]
    rows = []
    for path, d in entries:
        label, file = paths.row(path)
        proto = {k: paths.value(d["protocol"].get(k)) for k in varying if k != "data"}
        data = class_data(d["protocol"].get("data")) or None
        groups = ([(c, v) for c, v in d["per_class"].items()] if per_class else [])
        groups.append(("mean", d["mean"]))
        for cls, values in groups:
            cell = (data_total(data) if cls == "mean" else data.get(cls)) if data else None
            rows.append({"run": label, "file": file, "class": cls, "protocol": proto,
                         "data": paths.value(cell), **{m: values.get(m) for m in metrics}})
    return {"runs_dir": paths.shown_runs_dir, "protocol": shared, "varying": varying,
            "metrics": metrics, "data": any(r["data"] for r in rows), "rows": rows,
            "departures": departure_sets(entries, paths)}


def departure_sets(entries, paths):
    """The distinct ``departures`` of the runs: [{"runs": [labels], "departures": {topic:
    sentence}}], in first-seen order; runs without any are left out."""
    sets = {}
    for path, d in entries:
        dep = d["protocol"].get("departures")
        if dep:
            key = json.dumps(dep, sort_keys=True)
            sets.setdefault(key, {"runs": [], "departures": paths.value(dep)})
            sets[key]["runs"].append(paths.row(path)[0])
    return list(sets.values())


def departures_text(table, show=False):
    """Below the markdown table: the departure sets (``show``), else one line counting them."""
    sets = table.get("departures") or []
    if not sets:
        return []
    if not show:
        same = len(sets) == 1 and len(sets[0]["runs"]) == len(
            dict.fromkeys(r["run"] for r in table["rows"]))
        what = "the same for every run" if same else f"{len(sets)} different set(s)"
        return [f"Departures from the papers the configs follow: {what} "
                f"(--show_departures lists them)", ""]
    out = ["Departures from the papers the configs follow (as their files state them):", ""]
    for group in sets:
        out.append(f"runs {', '.join(group['runs'])}:")
        out += [f"- {k}: {v}" for k, v in group["departures"].items()] + [""]
    return out


DATA_COLUMNS = ("train", "test", "test_files", "skipped")


def _data_cells(data, csv_form=False):
    """The data columns of a row: counts, fingerprint, the skipped files (markdown: their
    number, listed under the table; CSV: the names, ``;``-separated)."""
    if not data:
        return ["" if csv_form else "-"] * len(DATA_COLUMNS)
    skipped = data.get("skipped") or []
    return [str(data.get("train")), str(data.get("test")), str(data.get("test_files")),
            ";".join(skipped) if csv_form else str(len(skipped))]


def to_markdown(table, per_class=False, show_departures=False):
    from tabulate import tabulate

    from dualmem.utils.results import protocol_line

    columns = [k for k in table["varying"] if k != "data"]
    data = table.get("data")
    headers = ["run"] + (["class"] if per_class else []) + columns + \
        (list(DATA_COLUMNS) if data else []) + table["metrics"]
    body, skipped = [], []
    for r in table["rows"]:
        body.append([r["run"]] + ([r["class"]] if per_class else []) +
                    [_show(r["protocol"][k], short=True) for k in columns] +
                    (_data_cells(r["data"]) if data else []) +
                    [_pct(r[m]) for m in table["metrics"]])
        if r["class"] == "mean" and r["data"]:
            skipped += [f"- {r['run']}: {f}" for f in r["data"].get("skipped") or []]
    shared = dict(table["protocol"])
    line = protocol_line(shared) if shared else "protocol: nothing shared; metrics in %"
    differs = (f"differs between runs: {', '.join(table['varying'])}" if table["varying"]
               else "every run has the same protocol")
    what = "per class and mean over classes" if per_class else "mean over classes"
    n_runs = len(dict.fromkeys(r["file"] for r in table["rows"]))
    notes = [f"runs under: {table['runs_dir']}"]
    if data:
        notes.append("train / test: images per class (summed for the mean); test_files: a "
                     "fingerprint of the test images' names and sizes; skipped: files left "
                     "out by dataset.on_bad_file: skip")
    text = [f"# Results of {n_runs} run(s)", "", line, "", f"{differs}; {what}", "",
            *notes, "", tabulate(body, headers=headers, tablefmt="github",
                                 disable_numparse=True), ""]
    if skipped:
        text += ["Skipped files:", "", *skipped, ""]
    text += departures_text(table, show_departures)
    return "\n".join(text)


def to_csv(table):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    columns = [k for k in table["varying"] if k != "data"]
    data = list(DATA_COLUMNS) if table.get("data") else []
    w.writerow(["run", "class", *columns, *data, *table["metrics"], "file"])
    for r in table["rows"]:
        w.writerow([r["run"], r["class"]] +
                   ["" if r["protocol"][k] is None else _show(r["protocol"][k])
                    for k in columns] + (_data_cells(r["data"], csv_form=True) if data else []) +
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
    p.add_argument("--show_departures", "--show-departures", action="store_true",
                   help="print each config's departures from its paper below the table")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        out_dir = Path(args.out).parent if args.out else Path.cwd()
        table = collect(args.paths, recurse=not args.no_recurse, per_class=args.per_class,
                        out_dir=out_dir)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    texts = {"md": to_markdown(table, args.per_class, args.show_departures),
             "csv": to_csv(table),
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
