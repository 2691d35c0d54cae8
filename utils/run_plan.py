"""Opening a run: a new run from a config, or an existing run folder whose own ``config.yaml``
and ``run.json`` are the record (``--resume``, ``--evaluate``).

Every training tool and the Python API open runs here, so the rules are one: a new run never
goes into a folder that holds a run; a change to an existing run (``--config``, ``--opts``,
data flags, a hand edit of its ``config.yaml``) is refused with the changed keys unless
``--override`` accepts it, and is then recorded in its history (utils/run_record.py).
``args`` is the tools' argument namespace (``config``, ``opts``, ``work_dir``, ``data_root``,
``data_type``, ``override``, ...); a missing attribute means the flag was not given.
"""
import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dualmem.utils import code_state

# --data_type: layouts whose manifests are prepared from the data itself
from dualmem.datasets.prepare import SOURCES as DATA_TYPES  # noqa: E402  (the one list)


def apply_data_args(cfg, data_root=None, data_type=None, classes=None, log=None):
    """Point the config at ``data_root`` (list) and/or restrict it to ``classes``."""
    ds = cfg.dataset
    if data_root:
        roots = [str(Path(os.path.expanduser(r)).resolve()) for r in data_root]
        kind = data_type or (ds.get("type") if ds.get("type") in DATA_TYPES else "mvtec")
        from dualmem.datasets.prepare import looks_like_folder

        if not data_type and kind != "folder" and all(looks_like_folder(r) for r in roots):
            kind = "folder"  # good/ (bad/, masks/) and no class folders: the user's own images
            if log:
                log(f"--data_root {', '.join(roots)}: a folder of good/bad images, read as "
                    f"--data_type folder")
        elif log and ds.get("type") not in DATA_TYPES and not data_type:
            log(f"--data_root given with dataset.type '{ds.get('type', 'explicit')}': "
                f"reading it as an MVTec-layout tree (--data_type to change)")
        ds["data_root"] = roots[0] if len(roots) == 1 else roots
        ds["type"] = kind
    elif data_type:
        ds["type"] = data_type
    if classes:
        ds["classes"] = list(classes)
    return cfg


def load_cfg(args, classes=None):
    """Config with ``--opts`` and the data arguments applied, validated again afterwards."""
    from dualmem.utils.config import load_config, validate_config
    from dualmem.utils.config_defaults import unused_keys

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


def unique_dir(path):
    """``path``, or ``path-2``, ``path-3``... when a folder of that name exists already."""
    path, n = Path(path), 2
    candidate = path
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate


def default_work_dir(config_path, pick_latest, prefix=""):
    """A new timestamped folder beside the config, or (``pick_latest``) the newest run there
    that holds a checkpoint."""
    from dualmem.utils.run_record import RunRecordError, newest_run

    runs = runs_dir_of(config_path)
    if pick_latest:
        found = newest_run(runs)
        if found is None:
            raise RunRecordError(f"no run folder holding a checkpoint under {runs}; pass "
                                 f"--work_dir")
        return found
    return unique_dir(runs / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}")


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
    from dualmem.utils import distributed as du
    from dualmem.utils.run_record import RECORD_NAME, RunRecordError, has_checkpoint

    if not getattr(args, "config", None):
        raise RunRecordError("--config is required to start a run (--resume/--evaluate "
                             "continue or score an existing one from --work_dir)")
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

    from dualmem.utils.config import load_config
    from dualmem.utils.run_record import RunRecordError

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
    from dualmem.utils.run_record import RunRecordError

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
    from dualmem.utils import distributed as du
    from dualmem.utils.config import apply_overrides, validate_config
    from dualmem.utils.run_record import (RunRecordError, check_not_shortened, config_diff,
                                  format_changes, hand_edit, read_record)

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
    # another method is one line, not the list of every key that follows from it
    from dualmem.utils.checkpoint_kind import CheckpointKindError, check_checkpoint_method, head_of

    have, want = head_of(stored.get("net")), head_of(requested.get("net"))
    if have and want and have[1] != want[1]:
        raise CheckpointKindError(f"{work_dir} is a {have[0]} run ({have[1]}); --config "
                                  f"builds {want[0]} ({want[1]}): start a new run for it")
    ckpt = Path(getattr(args, "checkpoint", None) or work_dir / "checkpoints" / "last.pth")
    if ckpt.is_file():
        check_checkpoint_method(ckpt, requested, getattr(args, "trust_checkpoint", False))
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


def run_dir_of_checkpoint(checkpoint):
    """``RUN/checkpoints/x.pth`` -> ``RUN`` when RUN is a run folder; else an error."""
    from dualmem.utils.run_record import RECORD_NAME, RunRecordError

    path = Path(checkpoint)
    if not path.is_file():
        raise RunRecordError(f"checkpoint not found: {path}")
    run = path.resolve().parent.parent
    if path.resolve().parent.name == "checkpoints" and (run / RECORD_NAME).is_file():
        return run
    raise RunRecordError(f"{path} is not inside a run folder (RUN/checkpoints/); pass the "
                         f"run with --work_dir, or use tools/predict.py for a lone checkpoint")


def plan_run(args, tool, classes=None):
    """The run ``args`` asks for (train_val.py, train_unified.py): a new one, or the existing
    run folder of ``--resume`` / ``--evaluate`` (the same on every rank)."""
    if args.evaluate or args.resume:
        action = "--evaluate" if args.evaluate else "--resume"
        work_dir = args.work_dir
        if args.evaluate and args.checkpoint and not work_dir:
            work_dir = run_dir_of_checkpoint(args.checkpoint)
        return plan_existing_run(args, tool, action, classes=classes,
                                 class_name=args.class_name, work_dir=work_dir)
    return plan_new_run(args, tool, classes=classes, class_name=args.class_name)


def evaluation_dir(run_dir, checkpoint):
    """Re-evaluations never touch the training run's results: each gets its own folder."""
    from dualmem.utils import distributed as du

    return du.broadcast_object(unique_dir(
        Path(run_dir) / "evaluations" / f"{Path(checkpoint).stem}-{time.strftime('%Y%m%d-%H%M%S')}"))
