"""What each training tool runs, once its arguments are parsed and the process is launched:
one run (``tools/train_val.py``, ``tools/train_unified.py``), one run per class
(``tools/train_per_class.py``) or a grid of runs (``tools/sweep.py``). Each opens its runs by
``utils/run_plan.py``, so a new run, a resume and an evaluation follow the same rules
everywhere, and builds one ``Trainer`` per run; ``args`` is the tool's argument namespace.
"""
import json
import sys
import time
import traceback
from pathlib import Path

from dualmem.utils.engine.trainer import Trainer, TrainingInterrupted
from dualmem.utils.errors import UserError


def run_single(args, device, tool, classes=None):
    """A new run, a ``--resume`` or an ``--evaluate`` of one run folder. Exit status 0."""
    from dualmem.utils import distributed as du
    from dualmem.utils.run_plan import evaluation_dir, plan_run

    p = plan_run(args, tool, classes)
    progress = not args.no_progress
    class_name = p.record.get("class_name")
    if args.evaluate:
        ckpt = Path(args.checkpoint) if args.checkpoint else \
            p.work_dir / "checkpoints" / "last.pth"
        out = evaluation_dir(p.work_dir, ckpt)
        trainer = Trainer(p.cfg, out, device, class_name=class_name, progress=progress,
                          record=p.record, changes=p.changes)
        trainer.evaluate(ckpt, vis=args.vis, trusted=args.trust_checkpoint,
                         allow_changes=args.override)
        _record_evaluation(p, out)
        return 0
    trainer = Trainer(p.cfg, p.work_dir, device, class_name=class_name, progress=progress,
                      record=p.record, changes=p.changes)
    if args.resume and not (p.work_dir / "checkpoints" / "last.pth").is_file():
        # stopped before its first checkpoint (a signal or a crash in stage one): nothing was
        # kept, so the run starts over; a new run into its folder is refused
        trainer.logger.info(f"{p.work_dir} holds no checkpoint yet: the run starts from epoch 0")
    elif args.resume:
        try:
            trainer.resume(trusted=args.trust_checkpoint)
        except BaseException:
            trainer.close()  # a refused resume leaves the folder free
            raise
    trainer.fit()
    if p.record.get("sweep") and du.is_main():  # a sweep's cell: its table shows the new results
        from dualmem.utils.sweep import refresh_report

        refresh_report(p.work_dir.resolve().parent)
    return 0


def _record_evaluation(p, out):
    """An evaluation under accepted changes is part of the run's history: appended to
    ``run.json`` as it is on disk now, under its lock (another command may be recording its
    own change to this run at the same time)."""
    from dualmem.utils import distributed as du
    from dualmem.utils.run_record import history_entry, update_record

    if p.changes and du.is_main():
        entry = history_entry("evaluate", p.changes, sys.argv)
        entry["output"] = str(out)
        update_record(p.work_dir, entries=[entry])


def _open_per_class(args):
    """The per-class sweep's plan, its classes, and each class's (config, changes)."""
    from dualmem.datasets.manifest import check_class_name
    from dualmem.utils.per_class import class_config, dataset_classes, refuse_shortening
    from dualmem.utils.run_plan import plan_existing_run, plan_new_run

    if args.evaluate or args.resume:
        action = "--evaluate" if args.evaluate else "--resume"
        plan = plan_existing_run(args, "train_per_class", action)
        classes = list(plan.record.get("classes") or dataset_classes(plan.cfg))
        for cls in classes:  # each becomes a folder: a path there must not lead outside
            check_class_name(cls, f"{plan.work_dir / 'run.json'}: class")
        if args.classes:  # a subset of the sweep's own classes, not a change of its config
            unknown = [c for c in args.classes if c not in classes]
            if unknown:
                raise UserError(f"--classes {', '.join(unknown)}: not in the sweep "
                                 f"{plan.work_dir} (its classes: {', '.join(classes)})")
            classes = [c for c in classes if c in args.classes]
    else:
        plan = plan_new_run(args, "train_per_class", classes=args.classes, setting="per-class")
        classes = dataset_classes(plan.cfg)  # checks the data before any folder exists
        plan.record["classes"] = classes
    jobs = {cls: class_config(plan, plan.work_dir / cls, args.override) for cls in classes}
    if args.resume:
        refuse_shortening(jobs, plan.work_dir, args.trust_checkpoint)
    return plan, classes, jobs


def run_per_class(args, device):
    """One model per class in ``<work_dir>/<class>/``, then the combined table; ``--resume``
    keeps finished classes, ``--evaluate`` writes ``<work_dir>/evaluations/<time>/``."""
    from dualmem.utils import distributed as du
    from dualmem.utils.config import save_config
    from dualmem.utils.logger import setup_logger
    from dualmem.utils.per_class import class_record, combine
    from dualmem.utils.results import protocol_line, results_table, write_results
    from dualmem.utils.run_plan import evaluation_dir
    from dualmem.utils.run_record import history_entry, update_record

    plan, classes, jobs = _open_per_class(args)
    work_dir = plan.work_dir
    out_dir = evaluation_dir(work_dir, "per-class") if args.evaluate else work_dir
    main = du.is_main()  # under torchrun rank 0 alone writes the sweep's own files
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if main and not args.evaluate:
        entries = [history_entry("resume", plan.changes, sys.argv)] if plan.changes else []
        if plan.record.get("dualmem_version") is None:  # a new sweep: its code, once
            from dualmem.utils.code_state import snapshot

            snap = snapshot(exclude=work_dir)
            plan.record.update(dualmem_version=snap.version, code_diff=snap.save(work_dir))
        plan.record = update_record(work_dir, plan.record, entries)
        save_config(plan.cfg, work_dir / "config.yaml")
    log = setup_logger(out_dir / "log.txt" if main else None, rank=du.rank())
    log.info(f"per-class sweep over {len(classes)} classes: {', '.join(classes)} -> {out_dir}")
    results, seconds = {}, {}
    for i, cls in enumerate(classes, 1):
        sub = work_dir / cls
        done = sub / "results.json"
        cfg, changes = jobs[cls]
        if args.resume and done.is_file() and not changes:
            results[cls] = json.loads(done.read_text(encoding="utf-8"))
            log.info(f"[{i}/{len(classes)}] {cls}: kept finished results from {done}")
            continue
        log.info(f"[{i}/{len(classes)}] {cls}")
        t0 = time.time()
        record = class_record(plan.record, cls, sub)
        if args.evaluate:
            trainer = Trainer(cfg, out_dir / cls, device, class_name=cls,
                              progress=not args.no_progress, record=record, changes=changes)
            res = trainer.evaluate(sub / "checkpoints" / "last.pth", vis=args.vis,
                                   trusted=args.trust_checkpoint, allow_changes=args.override)
        else:
            trainer = Trainer(cfg, sub, device, class_name=cls, progress=not args.no_progress,
                              record=record, changes=changes)
            if args.resume and (sub / "checkpoints" / "last.pth").is_file():
                try:
                    trainer.resume(trusted=args.trust_checkpoint)
                except BaseException:
                    trainer.close()
                    raise
            res = trainer.fit()
        if res is None:
            raise UserError(f"class '{cls}' produced no evaluation (trainer.max_epoch 0?)")
        results[cls], seconds[cls] = res, time.time() - t0
        # the class's Trainer took the logger over
        log = setup_logger(out_dir / "log.txt" if main else None, rank=du.rank())
    combined = combine(results, classes, seconds)
    if main:
        write_results(combined, out_dir)
    log.info(f"per-class results\n{protocol_line(combined['protocol'])}\n" +
             results_table(combined, fmt="simple"))
    return 0


def run_sweep(args, grid, device):
    """Every cell of ``grid`` in turn, each a run folder of its own under the sweep's folder;
    under torchrun each cell trains on every rank and rank 0 alone writes the comparison. Run
    again, the same command keeps the finished cells, continues an interrupted one and
    retries failed ones. A signal stops the sweep (exit 128+N). Exit status: 0 every cell
    trained, 1 some cell failed (recorded; the sweep went on)."""
    from dualmem.utils import distributed as du
    from dualmem.utils.config import load_config
    from dualmem.utils.per_class import refuse_shortening
    from dualmem.utils.run_plan import unique_dir
    from dualmem.utils.run_record import RECORD_NAME
    from dualmem.utils.sweep import check_folder, make_cells, write_report
    from dualmem.utils.workdir_lock import WorkDirLock

    main_rank = du.is_main()
    work_dir = Path(du.broadcast_object(Path(args.work_dir) if args.work_dir else unique_dir(
        Path(args.config).resolve().parent / "runs" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")))
    former = check_folder(work_dir, args, grid)
    du.barrier()  # every rank has looked before rank 0 writes
    cells = make_cells(grid, work_dir, former)
    # a cell folder a former run left is checked before anything trains
    plans = {c["name"]: _open_cell(args, c, work_dir / c["name"]) for c in cells
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
            _sweep_cell(args, grid, device, work_dir, cells, i, plans.get(cell["name"]))
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


def _open_cell(args, cell, cell_dir):
    """A cell folder a former run of this sweep left: its own config and record, checked
    against this command (a changed config is refused unless --override, then recorded)."""
    from dualmem.utils.run_plan import plan_existing_run
    from dualmem.utils.sweep import cell_args

    return plan_existing_run(cell_args(args, cell["overrides"], cell_dir), "sweep",
                             "a re-run of the sweep", class_name=args.class_name,
                             work_dir=cell_dir)


def _train_cell(args, overrides, cell_dir, device, plan=None):
    """Train one cell in a run folder of its own (``--work_dir CELL --evaluate/--resume``
    work on it as on any run), or continue it (``plan`` of a folder a former run left);
    returns the final-epoch results."""
    from dualmem.utils.run_plan import plan_new_run
    from dualmem.utils.sweep import cell_args

    if plan is None:
        plan = plan_new_run(cell_args(args, overrides, cell_dir), "sweep",
                            class_name=args.class_name)
        plan.record["sweep"] = {"folder": str(Path(cell_dir).resolve().parent),
                                "overrides": overrides}
    trainer = Trainer(plan.cfg, cell_dir, device, class_name=args.class_name,
                      progress=not args.no_progress, record=plan.record, changes=plan.changes)
    try:
        if plan.existing and (Path(cell_dir) / "checkpoints" / "last.pth").is_file():
            trainer.resume(trusted=args.trust_checkpoint)
        return trainer.fit(), getattr(trainer, "key_metric_used", trainer.key_metric)  # used
    finally:
        trainer.close()


def _sweep_cell(args, grid, device, work_dir, cells, i, plan):
    """One cell: kept when it finished under this very config, else trained or continued."""
    from dualmem.utils import distributed as du
    from dualmem.utils.sweep import write_report

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
        results, key_metric = _train_cell(args, cell["overrides"], work_dir / name, device, plan)
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
