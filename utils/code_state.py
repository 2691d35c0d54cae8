"""What code and software a run used, so its folder is enough to reproduce it.

``run.json`` keeps the DualMem commit and the package versions; a run started from a working
tree with uncommitted changes also keeps them (``code.diff``, the ``git diff HEAD`` of tracked
files), since the commit alone would not rebuild that code. A resume under another commit or
other package versions is recorded in the run's history, and so in its results' protocol.
"""
import hashlib
import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DIFF_NAME = "code.diff"
_PACKAGES = ("torch", "torchvision", "timm", "numpy", "sklearn", "cv2")


def _git(*args):
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                          timeout=10)


def code_version():
    """The DualMem commit, with '+dirty.<hash of the diff>' for uncommitted changes to tracked
    files (so two different sets of changes read differently), or 'unknown' outside git."""
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        if rev.returncode != 0:
            return "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    diff = code_diff()
    if diff is None:
        return rev.stdout.strip()
    return f"{rev.stdout.strip()}+dirty.{hashlib.sha1(diff.encode()).hexdigest()[:8]}"


def is_dirty(version):
    return "+dirty" in str(version or "")


def code_diff(max_new_file=1 << 20):
    """The uncommitted changes: ``git diff HEAD`` plus every untracked, not ignored file as a
    new-file patch (one over ``max_new_file`` bytes is named, not included); None when clean
    or not a git checkout."""
    try:
        out = _git("diff", "HEAD", "--no-color")
        if out.returncode != 0:
            return None
        parts = [out.stdout]
        for name in _git("ls-files", "--others", "--exclude-standard", "-z").stdout.split("\0"):
            if not name:
                continue
            size = (REPO_ROOT / name).stat().st_size
            if size > max_new_file:
                parts.append(f"# untracked {name}: {size} bytes, not included\n")
            else:  # exit status 1 = the files differ, as they do
                parts.append(_git("diff", "--no-index", "--no-color", "/dev/null", name).stdout)
    except (OSError, subprocess.SubprocessError):
        return None
    diff = "".join(parts)
    return diff if diff.strip() else None


def environment():
    """Python, platform and the versions of the packages that decide the numbers."""
    import importlib

    env = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            env[name] = str(importlib.import_module(name).__version__)  # torch: not a str
        except (ImportError, AttributeError):
            env[name] = None
    return env


def save_diff(work_dir, name=DIFF_NAME):
    """Write the working tree's diff into the run folder (atomically); its name, or None."""
    diff = code_diff()
    if diff is None:
        return None
    path = Path(work_dir) / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(diff, encoding="utf-8")
    os.replace(tmp, path)
    return name


def state_changes(record):
    """``[(key, recorded, now)]`` for the code version and package versions that differ from
    the latest the run recorded (its start, or a later resume's history entry)."""
    latest = {"dualmem_version": record.get("dualmem_version")}
    latest.update({f"environment.{k}": v for k, v in (record.get("environment") or {}).items()})
    for entry in record.get("history", []):
        for change in entry.get("changes", []):
            if change["key"] in latest:
                latest[change["key"]] = change["new"]
    now = {"dualmem_version": code_version()}
    now.update({f"environment.{k}": v for k, v in environment().items()})
    return [(k, latest[k], now[k]) for k in latest
            if latest[k] is not None and k in now and now[k] != latest[k]]
