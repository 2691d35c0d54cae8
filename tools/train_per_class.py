"""One model per class, in turn (the single-class setting; DuMeNet's sweep), one table at the end.

    python tools/train_per_class.py --config experiments/MVTec-AD/uniad/lite.yaml \\
        --data_root DATA/mvtec [--classes bottle cable] [--work_dir RUN]
    python tools/train_per_class.py --work_dir RUN --resume    # finish a sweep
    python tools/train_per_class.py --work_dir RUN --evaluate  # re-evaluate every class

Each class trains in ``<work_dir>/<class>/`` (a run folder of its own: config, run.json,
checkpoints, log, results); the sweep writes ``<work_dir>/results.json`` / ``results.md`` with
every class and the unweighted mean. With --resume, classes that already have results are kept
and an interrupted class continues from its last checkpoint. --evaluate writes
``<work_dir>/evaluations/<time>/`` (one folder per class and the combined table).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._common import (add_config_arg, add_data_args, add_run_args,  # noqa: E402
                           run_main)
from utils.errors import UserError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_arg(p)
    add_data_args(p)
    p.add_argument("--classes", nargs="+", default=None,
                   help="classes to train (default: every class of the dataset)")
    p.add_argument("-e", "--evaluate", action="store_true",
                   help="evaluate every class's <class>/checkpoints/last.pth only")
    p.add_argument("--vis", action="store_true", help="with --evaluate: heat-map panels")
    p.add_argument("--resume", action="store_true",
                   help="keep finished classes, continue an interrupted one")
    add_run_args(p)
    return p.parse_args(argv)


def combine(per_class_results, classes, seconds=None):
    """One results dict (the Trainer's format) from the per-class runs. A protocol entry the
    classes share is given once; one that differs (a class resumed alone to more epochs, with
    an override) is given per class, never as the first class's."""
    from utils.metrics import summarize

    per_class = {c: per_class_results[c]["per_class"][c] for c in classes}
    protocols = {c: per_class_results[c]["protocol"] for c in classes}
    protocol = {}
    for key in dict.fromkeys(k for p in protocols.values() for k in p):
        values = {c: p[key] for c, p in protocols.items() if key in p}
        first = next(iter(values.values()))
        same = len(values) == len(classes) and all(v == first for v in values.values())
        protocol[key] = first if same else values
        if not same and all(isinstance(v, dict) and list(v) == [c] for c, v in values.items()):
            protocol[key] = {c: v[c] for c, v in values.items()}  # already given by class
        elif not same and key == "overrides":  # a list as in every protocol, class named
            protocol[key] = [f"{c}: {o}" for c, v in values.items() for o in v]
    protocol.update(classes=list(classes), setting="per-class")
    out = {"protocol": protocol, "per_class": per_class, "mean": summarize(per_class),
           "epoch": {c: per_class_results[c].get("epoch") for c in classes}}
    if seconds is not None:
        out["seconds"] = {c: round(s, 1) for c, s in seconds.items()}
    return out


def class_record(record, cls, folder=None):
    """A class's own run.json: it can be resumed or evaluated alone with train_val.py. A class
    that has run already keeps its own record (its history, its code version)."""
    from utils.run_record import read_record

    own = read_record(folder) if folder is not None else None
    if own is not None:
        return own
    sub = dict(record, class_name=cls, setting="single-class", history=[])
    sub["part_of"] = "train_per_class"
    return sub


def class_config(plan, folder, override=False):
    """The config a class runs under and the changes it undergoes. A class keeps its own
    config (it may have been resumed alone, with an override) unless the sweep's config is
    changed now; the change then applies to every class, each diffed against its own config
    (a class trained to 3 epochs goes 3 -> 2, not the sweep's 1 -> 2). A hand edit of the
    class's config.yaml is such a change too: refused unless ``override``, then recorded."""
    from tools._common import load_run_config
    from utils.run_record import config_diff, format_changes, hand_edit, read_record

    if not plan.existing or not (folder / "config.yaml").is_file():
        return plan.cfg, []
    own = load_run_config(folder)
    edited = hand_edit(folder, read_record(folder) or {})
    base = edited[0] if edited else own  # the config the class's run.json recorded
    if plan.changes:
        return plan.cfg, config_diff(base, plan.cfg)
    by_hand = config_diff(base, own) if edited else []
    if by_hand and not override:
        raise UserError(f"{folder / 'config.yaml'} was edited by hand since "
                        f"{folder / 'run.json'} recorded it; refused, so that the class's "
                        f"numbers keep meaning what its record says. Changed:\n"
                        f"{format_changes(by_hand)}\nUndo the edit, or add --override to "
                        f"accept it (recorded in {folder / 'run.json'})")
    return own, by_hand


def refuse_shortening(jobs, work_dir, trusted):
    """Before anything trains: a run (``work_dir/<name>``, a class or a sweep's cell) already
    trained past its new trainer.max_epoch cannot get there by resuming."""
    from utils.checkpoint import load_checkpoint

    longer = []
    for name, (cfg, changes) in jobs.items():
        last = work_dir / name / "checkpoints" / "last.pth"
        if any(k == "trainer.max_epoch" for k, _, _ in changes) and last.is_file():
            state = load_checkpoint(last, map_location="cpu", trusted=trusted)
            trained = int(state["epoch"]) + (int(state.get("step") or 0) > 0)
            if trained > int(cfg.trainer.max_epoch):
                longer.append(f"{name} has trained {trained} epochs, trainer.max_epoch would "
                              f"be {cfg.trainer.max_epoch}")
    if longer:
        raise UserError(f"resuming {work_dir} refused, nothing was changed: a resume cannot "
                        f"train for fewer epochs than it has ({'; '.join(longer)})")


def run(args):
    from tools._common import launch

    if args.vis and not args.evaluate:
        raise UserError("--vis draws the panels of an evaluation: use it with --evaluate")
    return launch(_run, args)


def _run(args, device):
    from datasets.manifest import check_class_name
    from tools._common import dataset_classes, evaluation_dir, plan_existing_run, plan_new_run
    from utils import distributed as du
    from utils.config import save_config
    from utils.logger import setup_logger
    from utils.results import protocol_line, results_table, write_results
    from utils.run_record import history_entry, update_record
    from utils.engine import Trainer

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
    work_dir = plan.work_dir
    jobs = {cls: class_config(plan, work_dir / cls, args.override) for cls in classes}
    if args.resume:
        refuse_shortening(jobs, work_dir, args.trust_checkpoint)
    out_dir = evaluation_dir(work_dir, "per-class") if args.evaluate else work_dir
    main = du.is_main()  # under torchrun rank 0 alone writes the sweep's own files
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if main and not args.evaluate:
        entries = [history_entry("resume", plan.changes, sys.argv)] if plan.changes else []
        if plan.record.get("dualmem_version") is None:  # a new sweep: its code, once
            from utils.code_state import snapshot

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


def main(argv=None):
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
