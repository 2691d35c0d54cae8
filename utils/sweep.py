"""A grid of runs (tools/sweep.py): the grid, its cells, and the comparison table.

A sweep's folder holds ``sweep.json`` (the command that made it and every cell's state) and
``sweep.md`` (the table), both rewritten from the cells' own ``results.json`` so that a cell
resumed alone shows its new numbers. The loop that trains the cells is
``utils.engine.runs.run_sweep``; nothing here trains.
"""
import itertools
import json
import os
import re
from pathlib import Path

from dualmem.utils.errors import UserError


def split_values(text):
    """'a,[1,2],"x,y"' -> ['a', '[1,2]', '"x,y"']: commas inside brackets or quotes stay."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def parse_grid(entries):
    """['k=v1,v2', ...] -> [(key, [v1, v2]), ...], keys unique, no empty values."""
    grid = []
    for entry in entries:
        key, sep, values = entry.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UserError(f"--grid entry '{entry}' must look like key.sub=v1,v2")
        vals = split_values(values)
        if any(v == "" for v in vals):
            raise UserError(f"--grid entry '{entry}' has an empty value")
        if key in [k for k, _ in grid]:
            raise UserError(f"--grid key '{key}' is given twice")
        grid.append((key, vals))
    return grid


def cell_names(grid):
    """Readable, unique folder names: the shortest key suffixes that tell the keys apart."""
    keys = [k.split(".") for k, _ in grid]
    labels = []
    for parts in keys:
        for n in range(1, len(parts) + 1):
            if sum(k[-n:] == parts[-n:] for k in keys) == 1:
                break
        labels.append(".".join(parts[-n:]))
    return labels


def _safe(text):
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "x"


def _fmt(v):
    return "n/a" if v is None else f"{100.0 * v:.2f}"


def _from_disk(work_dir, cell):
    """A cell whose folder holds results.json shows them: the table follows the cells' own
    results (a cell resumed alone, with an override, included)."""
    path = Path(work_dir) / cell["name"] / "results.json"
    if path.is_file():
        res = json.loads(path.read_text(encoding="utf-8"))
        cell.update(status="ok", mean=res["mean"], protocol=res["protocol"],
                    epoch=res.get("epoch"))
        cell.pop("error", None)


def _write_atomic(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def identity(args, grid):
    """What makes a sweep folder this command's: a re-run of it resumes, any other is refused."""
    return {"config": str(Path(args.config).resolve()), "opts": list(args.opts),
            "class_name": args.class_name, "grid": [{"key": k, "values": v} for k, v in grid]}


def write_report(work_dir, args, grid, cells, fresh=("ok", "pending", "interrupted")):
    """sweep.json (everything) and sweep.md (protocol line + one row per cell). Cells whose
    status is in ``fresh`` are read again from their folders first."""
    from tabulate import tabulate

    from dualmem.utils.results import protocol_line

    for c in cells:
        if c["status"] in fresh:
            _from_disk(work_dir, c)
    done = [c for c in cells if c["status"] == "ok"]
    protocols = [c["protocol"] for c in done]
    differ = {k for p in protocols for k in p if any(q.get(k) != p.get(k) for q in protocols)}
    shared = {k: v for k, v in (protocols[0].items() if protocols else []) if k not in differ}
    varying = sorted(differ - {"opts"})  # the cells' opts are the grid's own columns
    metrics = list(dict.fromkeys(m for c in done for m in c["mean"]))
    labels = cell_names(grid)
    headers = [*labels, "status", *varying, *metrics, "epoch"]
    rows = []
    for c in cells:
        row = [c["values"][k] for k, _ in grid] + [c["status"]]
        if c["status"] == "ok":
            row += [c["protocol"].get(k) for k in varying]
            row += [_fmt(c["mean"].get(m)) for m in metrics] + [c.get("epoch")]
        else:
            row += [""] * len(varying) + [""] * len(metrics) + [""]
        rows.append(row)
    axes = " x ".join(k + "={" + ",".join(v) + "}" for k, v in grid)
    lines = [f"# Sweep of {args.config}", "",
             protocol_line(shared) if protocols else "protocol: no cell finished", "",
             f"grid: {axes}" + (f"; --opts {' '.join(args.opts)}" if args.opts else "")
             + "; mean over classes at the final epoch, metrics in %", "",
             tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), ""]
    for c in cells:
        if c["status"] == "failed":
            lines += [f"- **{c['name']}** failed: {c['error']}"]
        elif c["status"] == "interrupted":
            lines += [f"- **{c['name']}** interrupted: the same command continues the sweep"]
    _write_atomic(work_dir / "sweep.md", "\n".join(lines) + "\n")
    summary = {**identity(args, grid), "protocol": shared, "cells": cells}
    _write_atomic(work_dir / "sweep.json", json.dumps(summary, indent=2))


def refresh_report(work_dir):
    """Rewrite a sweep's table from its cells' folders (after a cell was resumed on its own).
    While the sweep itself runs it holds the folder, and re-reads every cell when it writes
    next; then nothing is done here. Returns whether the table was rewritten."""
    from types import SimpleNamespace

    from dualmem.utils.workdir_lock import WorkDirBusyError, WorkDirLock

    path = Path(work_dir) / "sweep.json"
    if not path.is_file():
        return False
    try:
        lock = WorkDirLock(work_dir).acquire()
    except WorkDirBusyError:
        return False
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        grid = [(g["key"], g["values"]) for g in summary["grid"]]
        args = SimpleNamespace(config=summary["config"], opts=summary.get("opts") or [],
                               class_name=summary.get("class_name"))
        write_report(Path(work_dir), args, grid, summary["cells"],
                     fresh=("ok", "pending", "interrupted", "failed"))
    finally:
        lock.release()
    return True


def cell_args(args, overrides, cell_dir):
    """The arguments one cell is opened with: the sweep's, plus its own overrides."""
    from types import SimpleNamespace

    return SimpleNamespace(config=args.config, opts=list(args.opts) + overrides,
                           data_root=args.data_root, data_type=args.data_type,
                           device=args.device, threads=args.threads, work_dir=str(cell_dir),
                           override=args.override)


def check_folder(work_dir, args, grid):
    """A sweep's folder is continued only by the command that made it (``--override`` lets
    the config and opts differ, recorded in each cell); anything else there is refused, never
    overwritten. Returns the former sweep.json's cells by name."""
    path = work_dir / "sweep.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); pass another --work_dir") from None
        mine = identity(args, grid)
        keys = ["grid"] if args.override else list(mine)
        differ = [f"{k}: {old.get(k)!r} there, {mine[k]!r} now" for k in keys
                  if old.get(k) != mine[k]]
        if differ:
            raise UserError(f"{work_dir} holds another sweep ({'; '.join(differ)}): only the "
                            f"same command continues it; pass another --work_dir")
        return {c["name"]: c for c in old.get("cells") or []}
    if work_dir.is_dir() and any(not p.name.startswith(".") for p in work_dir.iterdir()):
        raise UserError(f"{work_dir} is not empty and holds no sweep.json, so it is not a "
                        f"sweep's folder; pass another --work_dir (nothing there is touched)")
    return {}


def make_cells(grid, work_dir, former):
    """One cell per combination of the grid's values, with its folder name and overrides; a
    former run's timings are kept. Two cells sharing a folder are refused."""
    labels = cell_names(grid)
    cells = []
    for combo in itertools.product(*[v for _, v in grid]):
        values = {k: v for (k, _), v in zip(grid, combo)}
        name = "__".join(f"{_safe(lab)}={_safe(v)}" for lab, v in zip(labels, combo))
        cell = {k: v for k, v in former.get(name, {}).items() if k in ("seconds", "key_metric")}
        cell.update(name=name, values=values, work_dir=str(work_dir / name), status="pending",
                    overrides=[f"{k}={v}" for k, v in values.items()])
        cells.append(cell)
    names = [c["name"] for c in cells]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # two cells in one folder: the second would be refused or resume the first
        raise UserError(f"--grid gives several cells the folder {', '.join(twice)} (a value "
                        f"repeated, or values that differ only in characters a folder name "
                        f"drops): make every value of an axis distinct")
    return cells
