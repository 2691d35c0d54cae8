"""Train one model per cell of a Cartesian grid of config overrides; one comparison table.

    python tools/sweep.py --config experiments/demo/dumenet.yaml \
        --grid net.2.kwargs.memory_mode=channel,spatial,both \
               net.2.kwargs.fusion_mode=concat,gate \
        [--work_dir DIR] [--class_name C] [--device cpu] [--opts trainer.max_epoch=5]

Values are YAML-typed (``lr=1e-4,3e-4``; brackets protect commas: ``k=[1,2],[3,4]``). Each cell
trains with ``--opts`` plus its own overrides in ``<work_dir>/<cell>/`` (the usual run layout),
and ``<work_dir>/sweep.md`` / ``sweep.json`` compare the cells' final-epoch mean metrics under the
shared protocol line. A failing cell is recorded with its error and the sweep goes on; the exit
status is then 1. The table is rewritten after every cell, so a long sweep can be watched, and
from the cells' own results (a cell resumed alone with ``train_val.py --work_dir CELL --resume``
updates it). Ctrl-C stops the sweep (exit 130); the same command run again continues it:
finished cells are kept, an interrupted cell resumes, failed ones are tried again. Any other
command into that folder is refused.
"""
import argparse
import itertools
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._common import add_data_args, add_run_args  # noqa: E402
from utils.errors import UserError  # noqa: E402


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

    from utils.results import protocol_line

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

    from utils.workdir_lock import WorkDirBusyError, WorkDirLock

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


def _cell_args(args, overrides, cell_dir):
    from types import SimpleNamespace

    return SimpleNamespace(config=args.config, opts=list(args.opts) + overrides,
                           data_root=args.data_root, data_type=args.data_type,
                           device=args.device, threads=args.threads, work_dir=str(cell_dir),
                           override=args.override)


def open_existing(args, cell, cell_dir):
    """A cell folder a former run of this sweep left: its own config and record, checked
    against this command (a changed config is refused unless --override, then recorded)."""
    from tools._common import plan_existing_run

    return plan_existing_run(_cell_args(args, cell["overrides"], cell_dir), "sweep",
                             "a re-run of the sweep", class_name=args.class_name,
                             work_dir=cell_dir)


def run_cell(args, overrides, cell_dir, device, plan=None):
    """Train one cell in a run folder of its own (``--work_dir CELL --evaluate/--resume``
    work on it as on any run), or continue it (``plan`` of a folder a former run left);
    returns the final-epoch results."""
    from tools._common import plan_new_run
    from utils.engine import Trainer

    if plan is None:
        plan = plan_new_run(_cell_args(args, overrides, cell_dir), "sweep",
                            class_name=args.class_name)
        plan.record["sweep"] = {"folder": str(Path(cell_dir).resolve().parent),
                                "overrides": overrides}
    trainer = Trainer(plan.cfg, cell_dir, device, class_name=args.class_name,
                      progress=not args.no_progress, record=plan.record, changes=plan.changes)
    try:
        if plan.existing and (Path(cell_dir) / "checkpoints" / "last.pth").is_file():
            trainer.resume(trusted=args.trust_checkpoint)
        return trainer.fit(), trainer.key_metric
    finally:
        trainer.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config shared by every cell")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="one axis per entry; cells are the Cartesian product")
    p.add_argument("--class_name", default=None, help="train/evaluate this class only")
    add_data_args(p)
    add_run_args(p)
    return p.parse_args(argv)


def main(argv=None):
    """Exit status: 0 every cell trained, 1 some cell failed (recorded, the sweep went on), 2 a
    problem with the arguments (one line)."""
    from tools._common import launch, run_main

    def run(args):
        grid = parse_grid(args.grid)
        return launch(lambda a, device: sweep(a, grid, device), args)

    return run_main(run, parse_args(argv))


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


def sweep(args, grid, device):
    """Every cell in turn; under torchrun each cell trains on every rank and rank 0 alone
    writes the comparison. Run again, the same command keeps the finished cells, continues
    an interrupted one and retries failed ones. A signal stops the sweep (exit 128+N)."""
    from tools._common import unique_dir
    from tools.train_per_class import refuse_shortening
    from utils import distributed as du
    from utils.engine import TrainingInterrupted
    from utils.config import load_config
    from utils.run_record import RECORD_NAME
    from utils.workdir_lock import WorkDirLock

    main_rank = du.is_main()
    work_dir = Path(du.broadcast_object(Path(args.work_dir) if args.work_dir else unique_dir(
        Path(args.config).resolve().parent / "runs" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")))
    former = check_folder(work_dir, args, grid)
    du.barrier()  # every rank has looked before rank 0 writes
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
    # a cell folder a former run left is checked before anything trains
    plans = {c["name"]: open_existing(args, c, work_dir / c["name"]) for c in cells
             if (work_dir / c["name"] / RECORD_NAME).is_file()}
    for c in cells:  # and every new cell's config: a bad grid value stops the sweep up front
        if c["name"] not in plans:
            load_config(args.config, list(args.opts) + c["overrides"])
    refuse_shortening({n: (p.cfg, p.changes) for n, p in plans.items()}, work_dir,
                      args.trust_checkpoint)
    lock = None
    if main_rank:
        work_dir.mkdir(parents=True, exist_ok=True)
        lock = WorkDirLock(work_dir).acquire()
    try:
        if main_rank:
            write_report(work_dir, args, grid, cells)
        for i, cell in enumerate(cells):
            run_one(args, grid, device, work_dir, cells, i, plans.get(cell["name"]))
    except (TrainingInterrupted, KeyboardInterrupt):
        if main_rank:
            write_report(work_dir, args, grid, cells)
            print("[sweep] interrupted: run the same command again to continue (finished "
                  "cells are kept)", file=sys.stderr, flush=True)
        raise
    finally:
        if lock is not None:
            lock.release()
    n_failed = sum(c["status"] == "failed" for c in cells)
    if main_rank:
        print((work_dir / "sweep.md").read_text(encoding="utf-8"))
        if n_failed:
            print(f"[sweep] {n_failed} of {len(cells)} cells failed", file=sys.stderr)
    return 1 if n_failed else 0


def run_one(args, grid, device, work_dir, cells, i, plan):
    """One cell: kept when it finished under this very config, else trained or continued."""
    from utils import distributed as du
    from utils.engine import TrainingInterrupted

    cell, name, main_rank = cells[i], cells[i]["name"], du.is_main()
    if plan is not None and not plan.changes and (work_dir / name / "results.json").is_file():
        if main_rank:
            print(f"[sweep] cell {i + 1}/{len(cells)}: kept finished results of {name}",
                  flush=True)
        return
    if main_rank:
        print(f"[sweep] cell {i + 1}/{len(cells)}: {' '.join(cell['overrides'])}", flush=True)
    t0 = time.time()
    try:
        results, key_metric = run_cell(args, cell["overrides"], work_dir / name, device, plan)
        if results is None:
            raise RuntimeError("training finished without an evaluation")
        cell.update(status="ok", mean=results["mean"], protocol=results["protocol"],
                    epoch=results.get("epoch"), key_metric=key_metric)
        cell.pop("error", None)
    except (TrainingInterrupted, KeyboardInterrupt):
        cell.update(status="interrupted", seconds=round(time.time() - t0, 1))
        raise
    except Exception as exc:  # a failing cell must not end the sweep
        cell.update(status="failed", error=f"{type(exc).__name__}: {exc}".strip())
        if main_rank:
            (work_dir / name).mkdir(parents=True, exist_ok=True)
            (work_dir / name / "error.txt").write_text(traceback.format_exc(),
                                                       encoding="utf-8")
            print(f"[sweep] cell {name} failed: {cell['error']}", file=sys.stderr, flush=True)
    cell["seconds"] = round(time.time() - t0, 1)
    if main_rank:
        write_report(work_dir, args, grid, cells)


if __name__ == "__main__":
    sys.exit(main())
