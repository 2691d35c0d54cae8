"""Train and evaluate one model from a config (UniAD's entry point, without the launcher).

    python tools/train_val.py --config experiments/demo/config.yaml
    python tools/train_val.py --config CFG --class_name bottle
    python tools/train_val.py --config CFG --work_dir RUN --evaluate [--checkpoint P]
    python tools/train_val.py --config CFG --work_dir RUN --resume
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--class_name", default=None, help="train/evaluate this class only")
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate a checkpoint only")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint for --evaluate (default: <work_dir>/checkpoints/best.pth)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <work_dir>/checkpoints/last.pth")
    p.add_argument("--work_dir", default=None,
                   help="run folder (default: runs/<timestamp> beside the config; with "
                        "--resume/--evaluate: the newest run there)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"],
                   help="default: CUDA when available")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. trainer.max_epoch=5 net.0.kwargs.pretrained=false")
    return p.parse_args(argv)


def default_work_dir(config_path, pick_latest):
    runs = Path(config_path).resolve().parent / "runs"
    if pick_latest:
        existing = sorted(p for p in runs.glob("*") if p.is_dir()) if runs.is_dir() else []
        if not existing:
            raise SystemExit(f"error: no run folder under {runs}; pass --work_dir")
        return existing[-1]
    return runs / time.strftime("%Y%m%d-%H%M%S")


def main(argv=None):
    args = parse_args(argv)
    from utils.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.opts)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}")
    import torch  # noqa: F401  (after config errors, which should be instant)

    from utils.misc import resolve_device
    from utils.trainer import Trainer

    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(
        args.config, pick_latest=args.evaluate or args.resume)
    trainer = Trainer(cfg, work_dir, resolve_device(args.device), class_name=args.class_name,
                      progress=not args.no_progress)
    if args.evaluate:
        ckpt = args.checkpoint or work_dir / "checkpoints" / "best.pth"
        trainer.evaluate(ckpt)
        return 0
    if args.resume:
        trainer.resume()
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
