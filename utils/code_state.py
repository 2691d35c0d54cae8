"""What code and software a run used, so its folder is enough to reproduce it.

``run.json`` keeps the DualMem commit and the package versions; a run started from a working
tree with uncommitted changes also keeps them (``code.diff``: ``git diff HEAD`` plus the
untracked files, one patch that ``git apply`` puts back on that commit), since the commit
alone would not rebuild that code. The version and the diff come from one ``snapshot``, so the
hash in the version is the hash of the file written. A resume under another commit or other
package versions is recorded in the run's history, and so in its results' protocol.
"""
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DIFF_NAME = "code.diff"
# import name -> distributions that may provide it
_PACKAGES = {"torch": ("torch",), "torchvision": ("torchvision",), "timm": ("timm",),
             "numpy": ("numpy",), "sklearn": ("scikit-learn",),
             "cv2": ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                     "opencv-contrib-python-headless")}
_DIFF_FLAGS = ("--binary", "--no-color", "--no-ext-diff", "--no-textconv",
               "--src-prefix=a/", "--dst-prefix=b/")
MAX_NEW_FILES = 200          # untracked files put into the patch, at most
MAX_NEW_BYTES = 8 << 20      # and their total size


class Snapshot:
    """``version``: the commit, with ``+dirty.<8 hex of the diff>`` for uncommitted changes
    (``+dirty.unknown`` when they could not be read) or ``unknown`` outside git; ``diff``: the
    patch bytes, or None for a clean tree."""

    def __init__(self, version, diff=None):
        self.version, self.diff = version, diff

    @property
    def dirty(self):
        return is_dirty(self.version)

    def save(self, folder, name=DIFF_NAME):
        """Write the patch into ``folder`` (atomically); its name, or None when there is none."""
        if self.diff is None:
            return None
        path = Path(folder) / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_bytes(self.diff)
        os.replace(tmp, path)
        return name


def _git(*args):
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                          timeout=30)


def _untracked_patches(exclude):
    """New-file patches for the untracked, not ignored files, skipping run folders (a folder
    holding ``run.json``, or ``exclude``); files past the caps are named, not included."""
    out = _git("ls-files", "--others", "--exclude-standard", "-z")
    if out.returncode != 0:
        raise OSError("git ls-files failed")
    names = [n for n in out.stdout.decode("utf-8", "surrogateescape").split("\0") if n]
    skip = [Path(exclude).resolve()] if exclude else []
    parts, left, left_paths, total = [], [], [], 0
    for name in sorted(names):
        path = REPO_ROOT / name
        if any(p in path.resolve().parents for p in skip) or \
                any((d / "run.json").is_file() for d in path.parents if REPO_ROOT in d.parents):
            continue
        try:
            size = path.lstat().st_size
        except FileNotFoundError:  # removed since ls-files: not part of the tree any more
            continue
        if len(parts) >= MAX_NEW_FILES or total + size > MAX_NEW_BYTES:
            left.append(f"{name} ({size} bytes)")
            left_paths.append(path)
            continue
        diff = _git("diff", "--no-index", *_DIFF_FLAGS, "--", "/dev/null", name)
        if diff.returncode not in (0, 1):  # 1: the files differ, as they do
            raise OSError(f"git diff of untracked {name} failed")
        parts.append(diff.stdout)
        total += size
    if left:
        more = f" and {len(left) - 20} more" if len(left) > 20 else ""
        parts.append(("# untracked, not included (over %d files or %d bytes): %s%s\n"
                      % (MAX_NEW_FILES, MAX_NEW_BYTES, ", ".join(left[:20]), more)).encode())
        # their content still decides the version: an edit past the caps is another version
        parts.append(f"# content sha256 of the {len(left)} left out: "
                     f"{_content_hash(left_paths)}\n".encode())
    return parts


def _content_hash(paths):
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path.relative_to(REPO_ROOT)).encode("utf-8", "surrogateescape") + b"\0")
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as exc:
            h.update(f"unreadable: {exc.__class__.__name__}".encode())
        h.update(b"\0")
    return h.hexdigest()


def _checkout_in_enclosing_repo():
    """None when the checkout is its repository's root; 'tracked' when it is a folder of a
    larger repository (a monorepo) that tracks it; 'untracked' when it merely sits inside an
    unrelated repository."""
    top = _git("rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise OSError("git rev-parse --show-toplevel failed")
    if Path(top.stdout.decode().strip()).resolve() == Path(REPO_ROOT).resolve():
        return None
    listed = _git("ls-files", "-z", "--", ".")  # what it tracks in the checkout's folder
    return "tracked" if listed.returncode == 0 and listed.stdout.strip() else "untracked"


def snapshot(exclude=None):
    """The code as it is now: version and patch, read once. ``exclude``: a folder inside the
    checkout whose files are not code (the run's own folder)."""
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        if rev.returncode != 0:
            return Snapshot("unknown")
        head = rev.stdout.decode().strip()
        nested = _checkout_in_enclosing_repo()
    except (OSError, subprocess.SubprocessError):
        return Snapshot("unknown")
    if nested == "untracked":  # the enclosing repository's commit says nothing of this code
        return Snapshot("unknown")
    try:
        # --relative: paths from the checkout, so `git apply` in it puts files back in place
        tracked = _git("diff", "HEAD", *_DIFF_FLAGS, *(("--relative",) if nested else ()))
        if tracked.returncode != 0:
            raise OSError("git diff HEAD failed")
        diff = b"".join([tracked.stdout, *_untracked_patches(exclude)])
    except (OSError, subprocess.SubprocessError):
        return Snapshot(f"{head}+dirty.unknown")  # never call a tree clean unseen
    if not diff.strip():
        return Snapshot(head)
    return Snapshot(f"{head}+dirty.{hashlib.sha1(diff).hexdigest()[:8]}", diff)


def code_version():
    return snapshot().version


def is_dirty(version):
    return "+dirty" in str(version or "")


def environment():
    """Python, OS and the versions of the packages that decide the numbers, read from the
    installed distributions (nothing is imported); plain strings, so checkpoints holding the
    record still load with ``weights_only``."""
    from importlib import metadata

    env = {"python": platform.python_version(),
           "platform": f"{platform.system()}-{platform.machine()}"}
    for name, dists in _PACKAGES.items():
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None)
        for dist in dists if version is None else ():
            try:
                version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        env[name] = None if version is None else str(version)
    return env


def state_changes(record, version, env):
    """``[(key, recorded, now)]`` for the code version and package versions (``version``,
    ``env``: now) that differ from the latest the run recorded (its start, or a later
    history entry)."""
    latest = {"dualmem_version": record.get("dualmem_version")}
    latest.update({f"environment.{k}": v for k, v in (record.get("environment") or {}).items()})
    for entry in record.get("history", []):
        for change in entry.get("changes", []):
            if change["key"] in latest:
                latest[change["key"]] = change["new"]
    now = {"dualmem_version": version, **{f"environment.{k}": v for k, v in env.items()}}
    return [(k, latest[k], now[k]) for k in latest
            if latest[k] is not None and k in now and now[k] != latest[k]]
