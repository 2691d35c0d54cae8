"""Train and evaluate one model from a config (UniAD's entry point, without the launcher).

    python tools/train_val.py --config experiments/demo/config.yaml
    python tools/train_val.py --config CFG --class_name bottle
    python tools/train_val.py --work_dir RUN --resume          # the run's own config
    python tools/train_val.py --work_dir RUN --evaluate [--vis] [--checkpoint P]
    python tools/train_val.py --config experiments/MVTec-AD/uniad/lite.yaml \
        --data_root DATA/mvtec --class_name bottle

--resume and --evaluate read the run folder (config.yaml, run.json); flags that would change
it are refused unless --override, which records the change. Each evaluation writes its own
folder RUN/evaluations/<checkpoint>-<time>/; the training run's results are never rewritten.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._common import add_config_arg, add_data_args, add_run_args, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_arg(p)
    p.add_argument("--class_name", default=None, help="train/evaluate this class only")
    add_data_args(p)
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate a checkpoint only")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint for --evaluate (default: <work_dir>/checkpoints/last.pth, "
                        "the final epoch)")
    p.add_argument("--vis", action="store_true",
                   help="accepted for older commands: every evaluation now draws its panels "
                        "(image | ground truth | heat map | mask) under vis/<class>/<defect>/, "
                        "curves and report.html (settings: evaluator.vis)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <work_dir>/checkpoints/last.pth")
    add_run_args(p)
    return p.parse_args(argv)


def main(argv=None):
    """Exit status: 0 done, 2 a problem with the config/data/checkpoint/run (one clear line),
    128+N interrupted by signal N (resumable)."""
    return run_main(run, parse_args(argv))


def run(args, tool="train_val", classes=None):
    from tools._common import launch

    if args.vis and not args.evaluate:
        raise UserError("--vis draws the panels of an evaluation: use it with --evaluate")
    if args.evaluate and args.resume:
        raise UserError("--evaluate and --resume exclude each other")
    return launch(lambda a, device: _run(a, device, tool, classes), args)


def plan(args, tool, classes=None):
    """The run to open: a new one, or the existing run folder (the same on every rank)."""
    from tools._common import plan_existing_run, plan_new_run

    if args.evaluate or args.resume:
        action = "--evaluate" if args.evaluate else "--resume"
        work_dir = args.work_dir
        if args.evaluate and args.checkpoint and not work_dir:
            work_dir = run_dir_of_checkpoint(args.checkpoint)
        return plan_existing_run(args, tool, action, classes=classes,
                                 class_name=args.class_name, work_dir=work_dir)
    return plan_new_run(args, tool, classes=classes, class_name=args.class_name)


def run_dir_of_checkpoint(checkpoint):
    """``RUN/checkpoints/x.pth`` -> ``RUN`` when RUN is a run folder; else an error."""
    from utils.run_record import RECORD_NAME, RunRecordError

    path = Path(checkpoint)
    if not path.is_file():
        raise RunRecordError(f"checkpoint not found: {path}")
    run = path.resolve().parent.parent
    if path.resolve().parent.name == "checkpoints" and (run / RECORD_NAME).is_file():
        return run
    raise RunRecordError(f"{path} is not inside a run folder (RUN/checkpoints/); pass the "
                         f"run with --work_dir, or use tools/predict.py for a lone checkpoint")


def _run(args, device, tool, classes=None):
    from tools._common import evaluation_dir
    from utils import distributed as du
    from utils.engine import Trainer

    p = plan(args, tool, classes)
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
        from tools.sweep import refresh_report

        refresh_report(p.work_dir.resolve().parent)
    return 0


def _record_evaluation(p, out):
    """An evaluation under accepted changes is part of the run's history: appended to
    ``run.json`` as it is on disk now, under its lock (another command may be recording its
    own change to this run at the same time)."""
    from utils import distributed as du
    from utils.run_record import history_entry, update_record

    if p.changes and du.is_main():
        entry = history_entry("evaluate", p.changes, sys.argv)
        entry["output"] = str(out)
        update_record(p.work_dir, entries=[entry])


if __name__ == "__main__":
    sys.exit(main())
