"""Train and evaluate one model from a config (UniAD's entry point, without the launcher).

    python tools/train_val.py --config experiments/demo/config.yaml
    python tools/train_val.py --config CFG --class_name bottle
    python tools/train_val.py --config CFG --work_dir RUN --evaluate [--checkpoint P]
    python tools/train_val.py --config CFG --work_dir RUN --resume
    python tools/train_val.py --config experiments/MVTec-AD/uniad/lite.yaml \
        --data_root DATA/mvtec --class_name bottle
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._common import add_data_args, add_run_args, load_cfg, run_main  # noqa: E402
from tools._common import default_work_dir  # noqa: E402,F401  (kept importable from here)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--class_name", default=None, help="train/evaluate this class only")
    add_data_args(p)
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate a checkpoint only")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint for --evaluate (default: <work_dir>/checkpoints/best.pth)")
    p.add_argument("--vis", action="store_true",
                   help="with --evaluate: panels (image | ground truth | heat map | mask) under "
                        "<work_dir>/vis/<class>/<defect>/ (settings: evaluator.vis)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <work_dir>/checkpoints/last.pth")
    add_run_args(p)
    return p.parse_args(argv)


def main(argv=None):
    """Exit status: 0 done, 2 a problem with the config/data/checkpoint (one clear line),
    128+N interrupted by signal N (resumable)."""
    return run_main(run, parse_args(argv))


def run(args):
    from utils.misc import resolve_device
    from utils.trainer import Trainer

    if args.vis and not args.evaluate:
        raise ValueError("--vis draws the panels of an evaluation: use it with --evaluate")
    from utils import distributed as du

    cfg = load_cfg(args)
    device = du.init_distributed(resolve_device(args.device))
    if args.work_dir:
        work_dir = Path(args.work_dir)
    else:  # every rank must agree on a timestamped folder
        work_dir = du.broadcast_object(default_work_dir(
            args.config, pick_latest=args.evaluate or args.resume))
    try:
        return _run(args, cfg, work_dir, device, Trainer)
    finally:
        du.shutdown()


def _run(args, cfg, work_dir, device, Trainer):
    trainer = Trainer(cfg, work_dir, device, class_name=args.class_name,
                      progress=not args.no_progress)
    if args.evaluate:
        ckpt = args.checkpoint or work_dir / "checkpoints" / "best.pth"
        trainer.evaluate(ckpt, vis=args.vis)
        return 0
    if args.resume:
        trainer.resume()
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
