"""Prepare manifests on the fly for ``dataset.data_root`` and cache them.

A dataset folder is never written to. The cache sits in the user cache folder:
``$DUALMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/dualmem``, else ``~/.cache/dualmem``, under
``manifests/<source>-<key>/`` (or directly in ``dataset.cache_dir`` when a config names one);
``key`` hashes the source, the resolved root, the classes and the options, so two roots never
share an entry. A stat fingerprint of the source (folder mtimes, split files) is stored with it;
when it changes, the manifests are rebuilt and re-checked. Files are written atomically (temp
file + ``os.replace``). When the cache folder cannot be written (or lies inside a data root),
one warning is logged and the manifests go to a temporary folder removed at exit.
"""
import atexit
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dualmem.datasets.manifest import read_manifest, write_manifest, write_text_atomic
from dualmem.datasets.prepare import build_source, source_fingerprint
from dualmem.datasets.prepare.common import PrepareError, check_records, short_hash, summary, \
    write_prepared

CACHE_VERSION = 1
INFO_NAME = "source.json"
CACHE_ENV = "DUALMEM_CACHE_DIR"
_TEMP = {}  # the per-process fallback folder, created on first need
_WARNED = set()


@dataclass
class Manifests:
    train: str
    test: str
    image_dir: str  # None when filenames are absolute (several roots merged)


def user_cache_dir():
    """``$DUALMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/dualmem``, else ``~/.cache/dualmem``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    if os.environ.get("XDG_CACHE_HOME"):
        return (Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "dualmem").resolve()
    return (Path.home() / ".cache" / "dualmem").resolve()


def cache_base(cache_dir=None):
    """Where prepared manifests go: ``cache_dir`` when given, else the user cache folder."""
    if cache_dir:
        return Path(cache_dir).expanduser().resolve()
    return user_cache_dir() / "manifests"


def _data_folder(root):
    root = Path(root).resolve()
    return root if root.is_dir() else root.parent  # an ADer meta.json names a file


def _inside(path, folder):
    path = Path(path).resolve()
    return path == folder or folder in path.parents


def _temp_base():
    if "dir" not in _TEMP:
        _TEMP["dir"] = Path(tempfile.mkdtemp(prefix="dualmem-manifests-"))
        atexit.register(shutil.rmtree, _TEMP["dir"], True)
    return _TEMP["dir"]


def _probe(folder):
    """Create ``folder`` and write (then remove) a file in it; OSError when that fails."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=folder)
    os.close(fd)
    os.unlink(tmp)


def _fall_back(base, reason):
    temp = _temp_base()
    if str(base) not in _WARNED:
        _WARNED.add(str(base))
        logging.getLogger("dualmem").warning(
            f"warning: manifest cache {base} {reason}; preparing in {temp} for this run only "
            f"(set {CACHE_ENV} to a writable folder to keep the cache)")
    return temp


def writable_target(base, name, roots):
    """(base, base/name) ready for writing, or the temporary folder's pair (with a one-line
    warning) when ``base`` is not writable or lies inside a data root. Never a data root."""
    folders = [_data_folder(r) for r in roots]
    if any(_inside(base, f) for f in folders):
        base = _fall_back(base, "is inside a data folder, which is never written to")
    else:
        try:
            _probe(base / name)
            return base, base / name
        except OSError as exc:
            base = _fall_back(base, f"cannot be written ({exc.strerror or exc})")
    _probe(base / name)
    return base, base / name


def _read_info(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def _cached(target, params, fingerprint):
    info = _read_info(target / INFO_NAME)
    if info and info.get("params") == params and info.get("fingerprint") == fingerprint \
            and (target / "train.json").is_file() and (target / "test.json").is_file() \
            and (not info.get("image_dir") or os.path.isdir(info["image_dir"])):
        return Manifests(str(target / "train.json"), str(target / "test.json"),
                         info["image_dir"])
    return None


def prepare_one(source, root, classes=None, options=None, cache_dir=None, check_files=True,
                log=None):
    """Manifests of one root, built (and checked) only when the cache is missing or stale."""
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise PrepareError(f"data_root not found: {root}")
    options = dict(options or {})
    classes = sorted(classes) if classes else None
    params = {"version": CACHE_VERSION, "source": source, "root": str(root),
              "classes": classes, "options": options}
    name = f"{source}-{short_hash(params)}"
    base = cache_base(cache_dir)
    fingerprint = source_fingerprint(source, root, classes=classes, **options)
    if not _inside(base, _data_folder(root)):  # a valid entry is used even when read-only
        hit = _cached(base / name, params, fingerprint)
        if hit:
            return hit
    base, target = writable_target(base, name, [root])
    if base == _TEMP.get("dir"):
        hit = _cached(target, params, fingerprint)  # prepared earlier in this process
        if hit:
            return hit
    export_dir = None
    if source == "cifar10":
        from dualmem.datasets.prepare.cifar10 import export_key

        export_dir = base / export_key(root)
    prepared = build_source(source, root, classes=classes, export_dir=export_dir, **options)
    check_records(prepared, check_files=check_files)
    write_prepared(prepared, target)
    counts = {c: dict(zip(("train", "test_normal", "test_anomalous", "with_mask"), v))
              for c, v in summary(prepared).items()}
    _write_json(target / INFO_NAME, {"params": params, "fingerprint": fingerprint,
                                     "image_dir": prepared.image_dir,
                                     "source": prepared.source, "counts": counts,
                                     "notes": prepared.notes})
    if log:
        log(f"prepared {prepared.source}: {len(prepared.train)} train / {len(prepared.test)} "
            f"test images -> {target}")
        for note in prepared.notes:
            log(f"note: {note}")
    return Manifests(str(target / "train.json"), str(target / "test.json"), prepared.image_dir)


def _absolute(records, image_dir):
    out = []
    for r in records:
        r = dict(r)
        for key in ("filename", "maskname"):
            if r.get(key) and image_dir and not os.path.isabs(r[key]):
                r[key] = os.path.join(image_dir, r[key])
        out.append(r)
    return out


def merge(parts, roots, cache_dir=None):
    """One manifest pair over several roots (absolute paths); a class in two roots is an error
    because per-class metrics would silently mix two datasets."""
    owner, train, test = {}, [], []
    for part, root in zip(parts, roots):
        part_train = read_manifest(part.train)
        for cls in sorted({r["clsname"] for r in part_train}):
            if cls in owner:
                raise PrepareError(f"class '{cls}' is in both {owner[cls]} and {root}; "
                                   f"rename one class folder or choose classes")
            owner[cls] = root
        train += _absolute(part_train, part.image_dir)
        test += _absolute(read_manifest(part.test), part.image_dir)
    name = f"merged-{short_hash([str(p.train) for p in parts])}"
    _, target = writable_target(cache_base(cache_dir), name, roots)
    write_manifest(target / "train.json", train)
    write_manifest(target / "test.json", test)
    return Manifests(str(target / "train.json"), str(target / "test.json"), None)


def prepare_manifests(source, roots, classes=None, options=None, cache_dir=None,
                      check_files=True, log=None):
    """Manifests for one or several roots of the same source type."""
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    roots = [str(Path(r).expanduser().resolve()) for r in roots]
    if not roots:
        raise PrepareError("no data_root given")
    if len(roots) == 1:
        return prepare_one(source, roots[0], classes, options, cache_dir, check_files, log)
    parts = []
    for root in roots:
        mine = None
        if classes and source != "cifar10":
            present = list_classes(source, root, options)
            mine = [c for c in classes if c in present]
            if not mine:
                continue
        parts.append((root, prepare_one(source, root, mine, options, cache_dir, check_files,
                                        log)))
    if classes and source != "cifar10":
        found = {c for root, _ in parts for c in list_classes(source, root, options)}
        unknown = [c for c in classes if c not in found]
        if unknown:
            raise PrepareError(f"unknown class(es) {unknown} in data roots {roots}")
    return merge([p for _, p in parts], [r for r, _ in parts], cache_dir)


def list_classes(source, root, options=None):
    """Class names a root offers, without checking files (for sweeps and --classes)."""
    if source == "cifar10":
        from dualmem.datasets.prepare.cifar10 import CLSNAME

        return [CLSNAME]
    if source == "mvtec" or (source == "visa" and not (Path(root) / "split_csv").is_dir()):
        root = Path(root)
        return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())
    prepared = build_source(source, root, **(options or {}))
    return list(dict.fromkeys(r["clsname"] for r in prepared.train))
