"""The run folder as the record of a run: how it was invoked, and every change made to it since.

``<run>/run.json`` holds the invocation (tool, class selection, data roots and type, setting,
seen anomalies, device, threads) and a ``history`` of accepted overrides; ``<run>/config.yaml``
holds the resolved config. Whatever reads a run (resume, evaluate, report) starts from these two
files, and a requested change is either refused with the changed keys or recorded here.
"""
import json
import os
import time
from pathlib import Path
from dualmem.utils.errors import UserError

RECORD_NAME = "run.json"
# keys that describe where a config was read from or how it departs from its paper (prose),
# not what the run does: a run made before a sentence was reworded still resumes
_IGNORED_KEYS = ("config_path", "departures")


class RunRecordError(UserError):
    """A run folder that cannot be used as asked (missing, incomplete, or a refused change)."""


def read_record(work_dir):
    path = Path(work_dir) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunRecordError(f"{path} is unreadable ({exc}); it records how the run was made") \
            from None


def write_record(work_dir, record):
    """Atomically (temp file + rename): a crash never leaves half a record."""
    path = Path(work_dir) / RECORD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RECORD_NAME}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def update_record(work_dir, fields=None, entries=()):
    """Read, change and write ``run.json`` under its lock: ``fields`` set keys, ``entries`` are
    appended to the history as it is on disk now, so two commands on one run at once (two
    ``--override`` evaluations, a resume beside one) never lose each other's entry. Returns
    the record written."""
    from dualmem.utils.workdir_lock import record_lock

    with record_lock(work_dir):
        record = read_record(work_dir) or {}
        record.update({k: v for k, v in (fields or {}).items() if k != "history"})
        record["history"] = list(record.get("history") or []) + list(entries)
        write_record(work_dir, record)
    return record


def flatten(tree, prefix=""):
    """``{'a': {'b': [1, {'c': 2}]}}`` -> ``{'a.b.0': 1, 'a.b.1.c': 2}``: one entry per leaf,
    list elements by index, so a difference names the key ``--opts`` would use."""
    out = {}
    if isinstance(tree, dict):
        if not tree and prefix:
            out[prefix] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list)) for v in tree):
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}.{i}"))
    else:
        out[prefix] = list(tree) if isinstance(tree, tuple) else tree
    return out


_MISSING = "<unset>"


def config_diff(old, new):
    """``[(key, old value, new value), ...]`` for every leaf that differs, each config read as
    the code reads it: a key one leaves out has its default (utils/config_defaults.py), so a
    config saved before a default existed differs only where it means something else."""
    import copy

    from dualmem.utils.config import to_plain
    from dualmem.utils.config_defaults import apply_defaults

    a, b = (flatten(apply_defaults(copy.deepcopy(to_plain(c or {})))) for c in (old, new))
    changes = []
    for key in sorted(set(a) | set(b)):
        if key.split(".", 1)[0] in _IGNORED_KEYS:
            continue
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            changes.append((key, va, vb))
    return changes


def format_changes(changes, limit=40):
    lines = [f"  {key}: {old!r} -> {new!r}" for key, old, new in changes[:limit]]
    if len(changes) > limit:
        lines.append(f"  ... and {len(changes) - limit} more")
    return "\n".join(lines)


def history_entry(action, changes, argv=None):
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "action": action,
            "changes": [{"key": k, "old": o, "new": n} for k, o, n in changes],
            "argv": list(argv) if argv is not None else None}


def has_checkpoint(folder):
    ckpts = Path(folder) / "checkpoints"
    return ckpts.is_dir() and any(ckpts.glob("*.pth"))


def run_mtime(folder):
    """When a run last wrote a checkpoint (its own, or a per-class/sweep member's); None when
    it holds none."""
    folder = Path(folder)
    candidates = [folder] + [p for p in folder.iterdir() if p.is_dir()]
    times = [q.stat().st_mtime for c in candidates if has_checkpoint(c)
             for q in (c / "checkpoints").glob("*.pth")]
    return max(times) if times else None


def newest_run(runs_dir):
    """The newest run folder under ``runs_dir`` that holds a checkpoint (a folder left by a
    failed start holds none), or None."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    dated = [(t, p) for p in runs_dir.iterdir() if p.is_dir()
             for t in [run_mtime(p)] if t is not None]
    return max(dated)[1] if dated else None


CONFIG_NAME = "config.yaml"


def save_run_config(work_dir, cfg, record):
    """Write the run's ``config.yaml`` and note in ``record`` (``run.json``, which the caller
    writes next) the sha256 of its exact bytes and the config itself: a later hand edit of the
    file is then told apart from the recorded config, and what it changed can be listed."""
    from dualmem.utils.config import save_config, to_plain

    record["config_sha256"] = save_config(cfg, Path(work_dir) / CONFIG_NAME)
    record["config"] = to_plain(cfg)


def hand_edit(work_dir, record):
    """``(recorded config, recorded sha256, sha256 now)`` when ``config.yaml`` no longer holds
    the bytes ``run.json`` recorded (edited by hand since); None when it does, or for a run
    recorded before the hash was kept (nothing to compare with)."""
    import hashlib

    recorded = record.get("config_sha256")
    path = Path(work_dir) / CONFIG_NAME
    if not recorded or not isinstance(record.get("config"), dict) or not path.is_file():
        return None
    now = hashlib.sha256(path.read_bytes()).hexdigest()
    return None if now == recorded else (record["config"], recorded, now)


def epochs_trained(work_dir, trusted=False):
    """Epochs the run's ``checkpoints/last.pth`` has trained (a started epoch counts); None
    without one. (A per-class sweep's classes are checked one by one by its tool.)"""
    from dualmem.utils.checkpoint import load_checkpoint

    path = Path(work_dir) / "checkpoints" / "last.pth"
    if not path.is_file():
        return None
    state = load_checkpoint(path, map_location="cpu", trusted=trusted)
    return int(state.get("epoch") or 0) + (int(state.get("step") or 0) > 0)


def check_not_shortened(work_dir, max_epoch, trusted=False):
    """A resume can only lengthen a run: a ``trainer.max_epoch`` below the epochs its
    checkpoint has trained would train nothing and leave config.yaml claiming a length the
    weights never had."""
    trained = epochs_trained(work_dir, trusted)
    if trained is not None and max_epoch < trained:
        raise RunRecordError(f"--resume of {work_dir}: trainer.max_epoch {max_epoch} is below "
                             f"the {trained} epochs its checkpoints/last.pth has trained; a "
                             f"resume can only lengthen a run (to report an earlier epoch, "
                             f"--evaluate its checkpoint)")
