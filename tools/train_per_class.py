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
import sys

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

from dualmem.tools._common import (add_config_arg, add_data_args, add_run_args,  # noqa: E402
                           launch, run_main)
from dualmem.utils.errors import UserError  # noqa: E402


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


def run(args):
    from dualmem.utils.engine.runs import run_per_class

    if args.vis and not args.evaluate:
        raise UserError("--vis draws the panels of an evaluation: use it with --evaluate")
    return launch(run_per_class, args)


def main(argv=None):
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
