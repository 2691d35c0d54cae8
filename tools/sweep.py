"""Train one model per cell of a Cartesian grid of config overrides; one comparison table.

    python tools/sweep.py --config experiments/demo/dumenet.yaml \
        --grid net.2.kwargs.memory_mode=channel,spatial,both \
               net.2.kwargs.fusion_mode=concat,gate \
        [--work_dir DIR] [--class_name C] [--device cpu] [--opts trainer.max_epoch=5]

Values are YAML-typed (``lr=1e-4,3e-4``; brackets protect commas: ``k=[1,2],[3,4]``). Each cell
trains with ``--opts`` plus its own overrides in ``<work_dir>/<cell>/`` (the usual run layout),
and ``<work_dir>/sweep.md`` / ``sweep.json`` compare the cells' final-epoch mean metrics under the
shared protocol line. A failing cell is recorded with its error and the sweep goes on; the exit
status is then 1. The table is rewritten after every cell, so a long sweep can be watched.
"""
import argparse
import itertools
import json
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


def write_report(work_dir, args, grid, cells):
    """sweep.json (everything) and sweep.md (protocol line + one row per cell)."""
    from tabulate import tabulate

    from utils.results import protocol_line

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
    failed = [c for c in cells if c["status"] == "failed"]
    axes = " x ".join(k + "={" + ",".join(v) + "}" for k, v in grid)
    lines = [f"# Sweep of {args.config}", "",
             protocol_line(shared) if protocols else "protocol: no cell finished", "",
             f"grid: {axes}" + (f"; --opts {' '.join(args.opts)}" if args.opts else "")
             + "; mean over classes at the final epoch, metrics in %", "",
             tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), ""]
    for c in failed:
        lines += [f"- **{c['name']}** failed: {c['error']}"]
    (work_dir / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"config": str(Path(args.config).resolve()), "opts": list(args.opts),
               "class_name": args.class_name, "grid": [{"key": k, "values": v} for k, v in grid],
               "protocol": shared, "cells": cells}
    (work_dir / "sweep.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


def run_cell(args, overrides, cell_dir, device):
    """Train one cell in a run folder of its own (``--work_dir CELL --evaluate/--resume``
    work on it as on any run); returns the final-epoch results."""
    from types import SimpleNamespace

    from tools._common import plan_new_run
    from utils.engine import Trainer

    ns = SimpleNamespace(config=args.config, opts=list(args.opts) + overrides,
                         data_root=args.data_root, data_type=args.data_type,
                         device=args.device, threads=args.threads, work_dir=str(cell_dir))
    plan = plan_new_run(ns, "sweep", class_name=args.class_name)
    plan.record["sweep"] = {"folder": str(Path(cell_dir).parent), "overrides": overrides}
    trainer = Trainer(plan.cfg, cell_dir, device, class_name=args.class_name,
                      progress=not args.no_progress, record=plan.record)
    try:
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


def sweep(args, grid, device):
    """Every cell in turn; under torchrun each cell trains on every rank and rank 0 alone
    writes the comparison."""
    from tools._common import unique_dir
    from utils import distributed as du

    main_rank = du.is_main()
    work_dir = Path(du.broadcast_object(Path(args.work_dir) if args.work_dir else unique_dir(
        Path(args.config).resolve().parent / "runs" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")))
    if main_rank:
        work_dir.mkdir(parents=True, exist_ok=True)
    labels = cell_names(grid)
    cells = []
    combos = list(itertools.product(*[v for _, v in grid]))
    for i, combo in enumerate(combos):
        values = {k: v for (k, _), v in zip(grid, combo)}
        name = "__".join(f"{_safe(lab)}={_safe(v)}" for lab, v in zip(labels, combo))
        cell = {"name": name, "values": values, "work_dir": str(work_dir / name),
                "overrides": [f"{k}={v}" for k, v in values.items()]}
        if main_rank:
            print(f"[sweep] cell {i + 1}/{len(combos)}: {' '.join(cell['overrides'])}",
                  flush=True)
        t0 = time.time()
        try:
            results, key_metric = run_cell(args, cell["overrides"], work_dir / name, device)
            if results is None:
                raise RuntimeError("training finished without an evaluation")
            cell.update(status="ok", mean=results["mean"], protocol=results["protocol"],
                        epoch=results.get("epoch"), key_metric=key_metric)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failing cell must not end the sweep
            cell.update(status="failed", error=f"{type(exc).__name__}: {exc}".strip())
            if main_rank:
                (work_dir / name).mkdir(parents=True, exist_ok=True)
                (work_dir / name / "error.txt").write_text(traceback.format_exc(),
                                                           encoding="utf-8")
                print(f"[sweep] cell {name} failed: {cell['error']}", file=sys.stderr,
                      flush=True)
        cell["seconds"] = round(time.time() - t0, 1)
        cells.append(cell)
        if main_rank:
            write_report(work_dir, args, grid, cells)
    n_failed = sum(c["status"] == "failed" for c in cells)
    if main_rank:
        print((work_dir / "sweep.md").read_text(encoding="utf-8"))
        if n_failed:
            print(f"[sweep] {n_failed} of {len(cells)} cells failed", file=sys.stderr)
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
