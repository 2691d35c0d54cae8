"""One model over every class of one or several datasets (UniAD's unified setting).

    python tools/train_unified.py --config experiments/MVTec-AD/uniad/lite.yaml \\
        --data_root DATA/mvtec [--data_root DATA/mpdd] [--classes bottle cable]
    python tools/train_unified.py --config CFG --meta DATA/mvtec/meta.json --meta DATA/visa/meta.json
    python tools/train_unified.py --config CFG --work_dir RUN --evaluate

The run folder gets the usual results.json / results.md with one row per class and the mean.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._common import (add_config_arg, add_data_args, add_run_args, load_cfg,  # noqa: E402
                           resolve_work_dir, run_main)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_arg(p)
    add_data_args(p)
    p.add_argument("--meta", action="append", default=None, metavar="META_JSON",
                   help="ADer meta.json (or its folder); repeat for several datasets "
                        "(same as --data_type ader --data_root ...)")
    p.add_argument("--classes", nargs="+", default=None, help="only these classes")
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate a checkpoint only")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint for --evaluate (default: <work_dir>/checkpoints/best.pth)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <work_dir>/checkpoints/last.pth")
    add_run_args(p)
    args = p.parse_args(argv)
    if args.meta:
        if args.data_root or (args.data_type and args.data_type != "ader"):
            p.error("--meta cannot be combined with --data_root / another --data_type")
        args.data_root, args.data_type = args.meta, "ader"
    return args


def run(args):
    from utils.misc import resolve_device
    from utils.trainer import Trainer

    cfg = load_cfg(args, classes=args.classes)
    work_dir = resolve_work_dir(args, pick_latest=args.evaluate or args.resume)
    trainer = Trainer(cfg, work_dir, resolve_device(args.device),
                      progress=not args.no_progress)
    if args.evaluate:
        trainer.evaluate(args.checkpoint or work_dir / "checkpoints" / "best.pth")
        return 0
    if args.resume:
        trainer.resume()
    trainer.fit()
    return 0


def main(argv=None):
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
