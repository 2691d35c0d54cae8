"""One model over every class of one or several datasets (UniAD's unified setting).

    python tools/train_unified.py --config experiments/MVTec-AD/uniad/lite.yaml \\
        --data_root DATA/mvtec [--data_root DATA/mpdd] [--classes bottle cable]
    python tools/train_unified.py --config CFG --meta DATA/mvtec/meta.json --meta DATA/visa/meta.json
    python tools/train_unified.py --work_dir RUN --resume
    python tools/train_unified.py --work_dir RUN --evaluate [--vis]

The run folder gets the usual results.json / results.md with one row per class and the mean.
"""
import argparse
import sys

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

from dualmem.tools._common import (add_config_arg, add_data_args, add_run_args,  # noqa: E402
                           check_run_flags, launch, run_main)


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
                   help="checkpoint for --evaluate (default: <work_dir>/checkpoints/last.pth)")
    p.add_argument("--vis", action="store_true", help="with --evaluate: heat-map panels")
    p.add_argument("--resume", action="store_true",
                   help="continue from <work_dir>/checkpoints/last.pth")
    add_run_args(p)
    args = p.parse_args(argv)
    if args.meta:
        if args.data_root or (args.data_type and args.data_type != "ader"):
            p.error("--meta cannot be combined with --data_root / another --data_type")
        args.data_root, args.data_type = args.meta, "ader"
    args.class_name = None
    return args


def run(args):
    from dualmem.utils.engine.runs import run_single

    check_run_flags(args)
    return launch(lambda a, device: run_single(a, device, "train_unified", a.classes), args)


def main(argv=None):
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
