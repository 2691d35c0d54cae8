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
from utils.errors import UserError

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
    """``[(key, old value, new value), ...]`` for every leaf that differs."""
    a, b = flatten(old), flatten(new)
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
