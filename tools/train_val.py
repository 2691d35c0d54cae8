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

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

from dualmem.tools._common import (add_config_arg, add_data_args, add_run_args,  # noqa: E402
                           check_run_flags, launch, run_main)


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


def run(args):
    from dualmem.utils.engine.runs import run_single

    check_run_flags(args)
    return launch(lambda a, device: run_single(a, device, "train_val"), args)


if __name__ == "__main__":
    sys.exit(main())
