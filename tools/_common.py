"""Command-line pieces shared by train_val.py, train_unified.py and train_per_class.py.

One place for the common arguments, the ``--data_root`` handling (which sets
``dataset.data_root`` / ``dataset.type`` so the builder prepares manifests on the fly), the
default run folder and the user-error exit path, so the three tools cannot drift apart.
"""
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DATA_TYPES = ("mvtec", "visa", "cifar10", "ader", "folder")


def add_config_arg(p):
    p.add_argument("--config", required=True, help="YAML config")


def add_data_args(p):
    p.add_argument("--data_root", action="append", default=None, metavar="DIR",
                   help="dataset folder (MVTec layout unless --data_type says otherwise); "
                        "manifests are prepared and cached on the fly. Repeat for several "
                        "roots (one unified model over all their classes)")
    p.add_argument("--data_type", default=None, choices=DATA_TYPES,
                   help="layout of --data_root (default: the config's dataset.type when it "
                        "is one of these, else mvtec); ader: DIR is a meta.json or its folder")


def add_run_args(p):
    p.add_argument("--work_dir", default=None,
                   help="run folder (default: runs/<timestamp> beside the config; with "
                        "--resume/--evaluate: the newest run there)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"],
                   help="default: CUDA when available")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice). On a CPU shared "
                        "with other jobs, 1 avoids threads waiting on each other and can be "
                        "several times faster")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. trainer.max_epoch=5 net.0.kwargs.pretrained=false")


def apply_data_args(cfg, data_root=None, data_type=None, classes=None, log=None):
    """Point the config at ``data_root`` (list) and/or restrict it to ``classes``."""
    ds = cfg.dataset
    if data_root:
        roots = [str(Path(os.path.expanduser(r)).resolve()) for r in data_root]
        kind = data_type or (ds.get("type") if ds.get("type") in DATA_TYPES else "mvtec")
        if log and ds.get("type") not in DATA_TYPES and not data_type:
            log(f"--data_root given with dataset.type '{ds.get('type', 'explicit')}': "
                f"reading it as an MVTec-layout tree (--data_type to change)")
        ds["data_root"] = roots[0] if len(roots) == 1 else roots
        ds["type"] = kind
    elif data_type:
        ds["type"] = data_type
    if classes:
        ds["classes"] = list(classes)
    return cfg


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


def load_cfg(args, classes=None):
    """Config with ``--opts`` and the data arguments applied, validated again afterwards;
    ``--threads`` takes effect here too, before any model is built."""
    from utils.config import load_config, validate_config

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    else:
        warn_if_busy()

    cfg = load_config(args.config, args.opts)
    apply_data_args(cfg, getattr(args, "data_root", None), getattr(args, "data_type", None),
                    classes, log=lambda m: print(m, file=sys.stderr))
    validate_config(cfg, str(args.config))
    return cfg


def default_work_dir(config_path, pick_latest):
    runs = Path(config_path).resolve().parent / "runs"
    if pick_latest:
        existing = sorted(p for p in runs.glob("*") if p.is_dir()) if runs.is_dir() else []
        if not existing:
            raise SystemExit(f"error: no run folder under {runs}; pass --work_dir")
        return existing[-1]
    return runs / time.strftime("%Y%m%d-%H%M%S")


def resolve_work_dir(args, pick_latest):
    return Path(args.work_dir) if args.work_dir else default_work_dir(args.config, pick_latest)


def run_main(run, args):
    """Exit status: 0 done, 2 a problem with the config/data/checkpoint (one clear line, no
    traceback; DUALMEM_DEBUG=1 shows it), 128+N interrupted by signal N (resumable)."""
    from utils.errors import USER_ERRORS
    from utils.trainer import TrainingInterrupted

    try:
        return run(args)
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except USER_ERRORS as exc:
        if os.environ.get("DUALMEM_DEBUG") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def dataset_classes(cfg):
    """Classes of the configured training manifest, in order of appearance."""
    from datasets.builder import locate_manifests
    from datasets.manifest import read_manifest

    train_meta, _, _ = locate_manifests(cfg, cfg.dataset.get("classes"))
    seen = dict.fromkeys(r["clsname"] for r in read_manifest(train_meta))
    wanted = cfg.dataset.get("classes")
    if wanted:
        missing = [c for c in wanted if c not in seen]
        if missing:
            raise ValueError(f"class {', '.join(repr(c) for c in missing)} not in {train_meta} "
                             f"(classes there: {', '.join(seen)})")
        return list(wanted)
    return list(seen)
