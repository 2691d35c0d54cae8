"""Command-line pieces shared by every tool: arguments, the run folder, the exit path.

One place for the common arguments, the ``--data_root`` handling (which sets
``dataset.data_root`` / ``dataset.type`` so the builder prepares manifests on the fly), and
opening a run: a new run from ``--config``, or an existing run folder (``--resume``,
``--evaluate``) whose own ``config.yaml`` and ``run.json`` are the record. A requested change to
an existing run is refused with the changed keys unless ``--override`` accepts it; it is then
recorded in the run's history.
"""
import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from utils import code_state  # noqa: E402
from utils.errors import UserError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DATA_TYPES = ("mvtec", "visa", "cifar10", "ader", "folder")


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

    from utils.misc import resolve_device

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
    from utils import distributed as du

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
    from models.registry import reset_trust, trust_everything, trust_plugins

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
    """Config with ``--opts`` and the data arguments applied, validated again afterwards."""
    from utils.config import load_config, validate_config

    from utils.config_defaults import unused_keys

    cfg = load_config(args.config, args.opts)
    apply_data_args(cfg, getattr(args, "data_root", None), getattr(args, "data_type", None),
                    classes, log=lambda m: print(m, file=sys.stderr))
    validate_config(cfg, str(args.config))
    unused = unused_keys(cfg)
    if unused:
        print(f"warning: {args.config}: UniAD keys accepted for compatibility but never read "
              f"here: {', '.join(unused)}", file=sys.stderr)
    return cfg


def runs_dir_of(config_path):
    return Path(config_path).resolve().parent / "runs"


def default_work_dir(config_path, pick_latest, prefix=""):
    """A new timestamped folder beside the config, or (``pick_latest``) the newest run there
    that holds a checkpoint."""
    from utils.run_record import RunRecordError, newest_run

    runs = runs_dir_of(config_path)
    if pick_latest:
        found = newest_run(runs)
        if found is None:
            raise RunRecordError(f"no run folder holding a checkpoint under {runs}; pass "
                                 f"--work_dir")
        return found
    return unique_dir(runs / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_work_dir(args, pick_latest):
    return Path(args.work_dir) if args.work_dir else default_work_dir(args.config, pick_latest)


@dataclass
class RunPlan:
    """What a tool is about to do with a run folder: the config to use, the record, and the
    accepted changes (empty unless ``--override``)."""
    cfg: object
    work_dir: Path
    record: dict
    existing: bool
    changes: list = field(default_factory=list)


def new_record(tool, args, class_name=None, setting=None):
    """The invocation part of ``run.json``; the Trainer adds classes, seen anomalies, device."""
    return {
        "tool": tool,
        "argv": list(sys.argv),
        "config_file": str(Path(args.config).resolve()) if getattr(args, "config", None) else None,
        "opts": list(getattr(args, "opts", None) or []),
        "class_name": class_name,
        "data_root": getattr(args, "data_root", None),
        "data_type": getattr(args, "data_type", None),
        "setting": setting or ("single-class" if class_name else "unified"),
        "device": getattr(args, "device", None),
        "threads": getattr(args, "threads", None),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dualmem_version": None,  # read by the Trainer when the run starts (main process)
        "environment": code_state.environment(),
        "history": [],
    }


def plan_new_run(args, tool, classes=None, class_name=None, setting=None, work_dir=None):
    """A run that starts now: ``--config`` is required; the folder (not created yet) must not
    already hold a run, a per-class run or a sweep (its record or results would be replaced)."""
    from utils.run_record import RECORD_NAME, RunRecordError, has_checkpoint

    if not getattr(args, "config", None):
        raise RunRecordError("--config is required to start a run (--resume/--evaluate "
                             "continue or score an existing one from --work_dir)")
    from utils import distributed as du

    cfg = load_cfg(args, classes)
    # rank 0 names the folder (a timestamp), every rank uses that name
    work_dir = Path(du.broadcast_object(
        work_dir or args.work_dir or default_work_dir(args.config, False)))
    held = ["checkpoints/"] if has_checkpoint(work_dir) else [
        n for n in (RECORD_NAME, "results.json", "sweep.json") if (work_dir / n).is_file()]
    if held:
        raise RunRecordError(f"{work_dir} already holds a run ({held[0]}); continue it with "
                             f"--work_dir {work_dir} --resume, or pass another --work_dir")
    return RunPlan(cfg, work_dir, new_record(tool, args, class_name, setting), existing=False)


def load_run_config(work_dir):
    """The resolved config a run folder holds, as it was saved."""
    import yaml

    from utils.config import load_config
    from utils.run_record import RunRecordError

    path = Path(work_dir) / "config.yaml"
    if not path.is_file():
        raise RunRecordError(f"{work_dir} has no config.yaml: not a run folder (a run folder "
                             f"holds config.yaml, run.json and checkpoints/)")
    cfg = load_config(path)
    original = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("config_path")
    if original:
        cfg["config_path"] = original
    return cfg


def locate_existing_run(args, action):
    """``--work_dir`` (which must exist: nothing is created for a mistyped path), else the
    newest run beside ``--config``."""
    from utils.run_record import RunRecordError

    if args.work_dir:
        work_dir = Path(args.work_dir)
        if not work_dir.is_dir():
            raise RunRecordError(f"--work_dir {work_dir} does not exist; {action} needs an "
                                 f"existing run folder (nothing was created)")
        return work_dir
    if getattr(args, "config", None):
        return default_work_dir(args.config, pick_latest=True)
    raise RunRecordError(f"{action} needs --work_dir RUN (or --config, to use the newest run "
                         f"beside it)")


def plan_existing_run(args, tool, action, classes=None, class_name=None, work_dir=None):
    """The run's own config and record, with the changes the flags ask for: refused (listing
    each key with its old and new value) unless ``--override``."""
    from utils.config import apply_overrides, validate_config
    from utils.run_record import (RunRecordError, check_not_shortened, config_diff,
                                  format_changes, hand_edit, read_record)

    from utils import distributed as du

    work_dir = Path(du.broadcast_object(work_dir or locate_existing_run(args, action)))
    if not work_dir.is_dir():
        raise RunRecordError(f"--work_dir {work_dir} does not exist; {action} needs an "
                             f"existing run folder (nothing was created)")
    stored = load_run_config(work_dir)
    record = read_record(work_dir)
    if record is None:
        raise RunRecordError(f"{work_dir} has no run.json (made by an older DualMem, or not a "
                             f"run folder): {action} cannot tell how it was invoked")
    if getattr(args, "config", None):
        requested = load_cfg(args, classes)
    else:
        requested = copy.deepcopy(stored)
        apply_overrides(requested, getattr(args, "opts", None))
        apply_data_args(requested, getattr(args, "data_root", None),
                        getattr(args, "data_type", None), classes)
        validate_config(requested, f"{work_dir / 'config.yaml'} with --opts")
    # a hand edit of config.yaml is a change like --opts: diffed against the recorded config
    edited = hand_edit(work_dir, record)
    changes = config_diff(edited[0] if edited else stored, requested)
    by_hand = bool(edited and changes and not getattr(args, "config", None))
    if by_hand:
        changes.insert(0, ("config.yaml", f"sha256 {edited[1][:12]} (as recorded)",
                           f"sha256 {edited[2][:12]} (edited by hand)"))
    if class_name is not None and class_name != record.get("class_name"):
        changes.append(("--class_name", record.get("class_name"), class_name))
    if action == "--resume" and any(k == "trainer.max_epoch" for k, _, _ in changes):
        check_not_shortened(work_dir, requested["trainer"]["max_epoch"],
                            getattr(args, "trust_checkpoint", False))
    if changes and not getattr(args, "override", False):
        seen = [k for k, _, _ in changes if k.startswith("dataset.seen_anomalies")]
        files = (record.get("seen_anomalies") or {}).get("files") or []
        hint = (f"\nThe run trained on these test images (its seen anomalies): "
                f"{', '.join(files[:5])}" if seen and files else "")
        what, undo = ("changes to the run's config (its config.yaml was edited by hand since "
                      "run.json recorded it)", "Undo the edit (and drop any such flags)") \
            if by_hand else ("flags that change the run's config", "Drop those flags")
        raise RunRecordError(
            f"{action} of {work_dir} with {what}; refused, so "
            f"that the run's numbers keep meaning what its record says. Changed:\n"
            f"{format_changes(changes)}\n"
            f"{undo} to use the run as recorded, or add --override to accept the "
            f"change (recorded in {work_dir / 'run.json'}){hint}")
    record = dict(record)
    if class_name is not None:
        record["class_name"] = class_name
    return RunPlan(requested if changes else stored, work_dir, record, existing=True,
                   changes=changes)


def evaluation_dir(run_dir, checkpoint):
    """Re-evaluations never touch the training run's results: each gets its own folder."""
    from utils import distributed as du

    return du.broadcast_object(unique_dir(
        Path(run_dir) / "evaluations" / f"{Path(checkpoint).stem}-{time.strftime('%Y%m%d-%H%M%S')}"))


def unique_dir(path):
    """``path``, or ``path-2``, ``path-3``... when a folder of that name exists already."""
    path, n = Path(path), 2
    candidate = path
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate


def run_main(run, args):
    """Exit status: 0 done, 2 a problem with the config/data/checkpoint/run folder (one clear
    line, no traceback; DUALMEM_DEBUG=1 shows it), 128+N interrupted by signal N (resumable)."""
    from utils.errors import USER_ERRORS
    from utils.engine import TrainingInterrupted

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
            raise UserError(f"class {', '.join(repr(c) for c in missing)} not in {train_meta} "
                             f"(classes there: {', '.join(seen)})")
        return list(wanted)
    return list(seen)
