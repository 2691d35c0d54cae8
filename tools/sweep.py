"""Train one model per cell of a Cartesian grid of config overrides; one comparison table.

    python tools/sweep.py --config experiments/demo/dumenet.yaml \
        --grid net.2.kwargs.memory_mode=channel,spatial,both \
               net.2.kwargs.fusion_mode=concat,gate \
        [--work_dir DIR] [--class_name C] [--device cpu] [--opts trainer.max_epoch=5]

Values are YAML-typed (``lr=1e-4,3e-4``; brackets protect commas: ``k=[1,2],[3,4]``). Each cell
trains with ``--opts`` plus its own overrides in ``<work_dir>/<cell>/`` (the usual run layout),
and ``<work_dir>/sweep.md`` / ``sweep.json`` compare the cells' final-epoch mean metrics under the
shared protocol line. A failing cell is recorded with its error and the sweep goes on; the exit
status is then 1. The table is rewritten after every cell, so a long sweep can be watched, and
from the cells' own results (a cell resumed alone with ``train_val.py --work_dir CELL --resume``
updates it). Ctrl-C stops the sweep (exit 130); the same command run again continues it:
finished cells are kept, an interrupted cell resumes, failed ones are tried again. Any other
command into that folder is refused.
"""
import argparse
import sys

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

from dualmem.tools._common import add_data_args, add_run_args, launch, run_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config shared by every cell")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="one axis per entry; cells are the Cartesian product")
    p.add_argument("--class_name", default=None, help="train/evaluate this class only")
    add_data_args(p)
    add_run_args(p)
    return p.parse_args(argv)


def run(args):
    from dualmem.utils.engine.runs import run_sweep
    from dualmem.utils.sweep import parse_grid

    grid = parse_grid(args.grid)
    return launch(lambda a, device: run_sweep(a, grid, device), args)


def main(argv=None):
    """Exit status: 0 every cell trained, 1 some cell failed (recorded, the sweep went on), 2 a
    problem with the arguments (one line)."""
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
