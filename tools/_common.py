"""Command-line pieces shared by every tool: arguments, the launch helper, the exit path.

Only what belongs to a command line lives here (the common arguments, ``--device`` /
``--threads``, trust flags, ``launch`` and ``run_main``); opening a run folder is
``utils/run_plan.py`` and what each tool runs is ``utils/engine/runs.py``, so a tool is its
arguments plus one call.
"""
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

from dualmem.utils.errors import UserError  # noqa: E402
from dualmem.utils.run_plan import DATA_TYPES  # noqa: E402
# tools/benchmark_coreset.py and benchmark_dmad.py still import it from here


def add_config_arg(p, required=False):
    p.add_argument("--config", required=required,
                   help="YAML config (for --resume/--evaluate only needed to pick the newest "
                        "run beside it, or to change the run with --override)")


def add_data_args(p):
    p.add_argument("--data_root", action="append", default=None, metavar="DIR",
                   help="dataset folder (MVTec layout unless --data_type says otherwise); "
                        "manifests are prepared and cached on the fly. Repeat for several "
                        "roots (one unified model over all their classes)")
    p.add_argument("--data_type", default=None, choices=DATA_TYPES,
                   help="layout of --data_root (default: the config's dataset.type when it "
                        "is one of these, else mvtec); ader: DIR is a meta.json or its folder")


def add_device_args(p):
    """``--device`` and ``--threads``, the same in every tool."""
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"],
                   help="default: CUDA when available")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice). On a CPU shared "
                        "with other jobs, 1 avoids threads waiting on each other and can be "
                        "several times faster")


def apply_device_args(args):
    """Set ``--threads`` before any model is built; the resolved ``torch.device``."""
    import torch

    from dualmem.utils.misc import resolve_device

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    else:
        warn_if_busy()
    return resolve_device(getattr(args, "device", None))


def launch(fn, args):
    """Run ``fn(args, device)`` as one process, or as one rank of ``torchrun`` (detectron2's
    ``launch()``): the process group starts here, every rank gets its device, and it is shut
    down however ``fn`` ends. Every training tool goes through this."""
    from dualmem.utils import distributed as du

    device = du.init_distributed(apply_device_args(args))
    try:
        return fn(args, device)
    finally:
        du.shutdown()


def add_trust_arg(p):
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="open a checkpoint that holds more than tensors and plain data (an "
                        "old or foreign file), and build any module type its config names. "
                        "Opening such a file can run code from it: only for files from a "
                        "source you trust")
    p.add_argument("--plugins", nargs="+", default=[], metavar="MODULE",
                   help="your own Python modules whose classes a config may name in net: "
                        "(imported before the model is built; without this, a config builds "
                        "only DualMem's registered modules)")


def apply_trust_args(args):
    """What code the person running the command trusts: named on the command line, never
    taken from a file."""
    from dualmem.models.registry import reset_trust, trust_everything, trust_plugins

    reset_trust()  # each command says for itself (tools may run in one process, as in tests)
    trust_plugins(getattr(args, "plugins", None) or [])
    trust_everything(bool(getattr(args, "trust_checkpoint", False)))


def add_run_args(p):
    p.add_argument("--work_dir", default=None,
                   help="run folder (default: runs/<timestamp> beside the config; with "
                        "--resume/--evaluate: the newest run there holding a checkpoint)")
    add_device_args(p)
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. trainer.max_epoch=5 net.0.kwargs.pretrained=false")
    p.add_argument("--override", action="store_true",
                   help="with --resume/--evaluate: accept --config/--opts/data flags that "
                        "change the run's config (recorded in run.json's history and in the "
                        "protocol); without it such a change is refused")
    add_trust_arg(p)


def check_run_flags(args):
    """The flag combinations train_val.py and train_unified.py refuse before anything starts."""
    if args.vis and not args.evaluate:
        raise UserError("--vis draws the panels of an evaluation: use it with --evaluate")
    if args.evaluate and args.resume:
        raise UserError("--evaluate and --resume exclude each other")


def warn_if_busy():
    """Other jobs on the CPU make torch's threads wait on each other (3-30x slower measured):
    say so once when the load average already fills every core."""
    if not hasattr(os, "getloadavg"):
        return
    import torch

    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if torch.get_num_threads() > 1 and load >= cores:
        print(f"note: load average {load:.1f} on {cores} CPUs (other jobs are running); if "
              f"training is slow, --threads 1 keeps torch's threads from waiting on each other",
              file=sys.stderr)


def run_main(run, args):
    """Exit status: 0 done, 2 a problem with the config/data/checkpoint/run folder (one clear
    line, no traceback; DUALMEM_DEBUG=1 shows it), 128+N interrupted by signal N (resumable)."""
    from dualmem.utils.errors import USER_ERRORS
    from dualmem.utils.engine import TrainingInterrupted

    try:
        apply_trust_args(args)
        return run(args)
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except USER_ERRORS as exc:
        if os.environ.get("DUALMEM_DEBUG") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
