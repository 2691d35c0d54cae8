"""Prepare manifests on the fly for ``dataset.data_root`` and cache them.

The cache sits in ``<data_root>/.dualmem/<key>/`` when the data folder is writable, otherwise
(read-only shares, e.g. /work/shared/data) in ``<repo>/data/manifests/<key>/``; ``key`` hashes
source, root, classes and options. A stat fingerprint of the source (folder mtimes, split
files) is stored with it; when it changes, the manifests are rebuilt and re-checked.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

from datasets.manifest import read_manifest, write_manifest
from datasets.prepare import build_source, source_fingerprint
from datasets.prepare.common import PrepareError, check_records, short_hash, summary, \
    write_prepared

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_VERSION = 1
INFO_NAME = "source.json"


@dataclass
class Manifests:
    train: str
    test: str
    image_dir: str  # None when filenames are absolute (several roots merged)


def _writable(folder):
    """Write permission in the mode bits too: root passes os.access on read-only shares."""
    try:
        st = folder.stat()
    except OSError:
        return False
    return os.access(folder, os.W_OK) and bool(st.st_mode & 0o222)


def cache_base(root, cache_dir=None):
    if cache_dir:
        return Path(cache_dir)
    folder = root if root.is_dir() else root.parent
    if _writable(folder):
        return folder / ".dualmem"
    return REPO_ROOT / "data" / "manifests"


def _read_info(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path, obj):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
    base = cache_base(root, cache_dir)
    try:
        target = base / f"{source}-{short_hash(params)}"
        target.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only mount whose mode bits say writable
        base = REPO_ROOT / "data" / "manifests"
        target = base / f"{source}-{short_hash(params)}"
        target.mkdir(parents=True, exist_ok=True)
    # fingerprint after creating the cache folder, whose creation changes the root's mtime
    fingerprint = source_fingerprint(source, root, classes=classes, **options)
    info_path = target / INFO_NAME
    info = _read_info(info_path)
    train, test = target / "train.json", target / "test.json"
    if info and info.get("params") == params and info.get("fingerprint") == fingerprint \
            and train.is_file() and test.is_file():
        return Manifests(str(train), str(test), info["image_dir"])
    export_dir = None
    if source == "cifar10":
        from datasets.prepare.cifar10 import export_key

        export_dir = base / export_key(root)
    prepared = build_source(source, root, classes=classes, export_dir=export_dir, **options)
    check_records(prepared, check_files=check_files)
    write_prepared(prepared, target)
    counts = {c: dict(zip(("train", "test_normal", "test_anomalous", "with_mask"), v))
              for c, v in summary(prepared).items()}
    _write_json(info_path, {"params": params, "fingerprint": fingerprint,
                            "image_dir": prepared.image_dir, "source": prepared.source,
                            "counts": counts, "notes": prepared.notes})
    if log:
        log(f"prepared {prepared.source}: {len(prepared.train)} train / {len(prepared.test)} "
            f"test images -> {target}")
        for note in prepared.notes:
            log(f"note: {note}")
    return Manifests(str(train), str(test), prepared.image_dir)


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
    base = Path(cache_dir) if cache_dir else REPO_ROOT / "data" / "manifests"
    target = base / f"merged-{short_hash([str(p.train) for p in parts])}"
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
        from datasets.prepare.cifar10 import CLSNAME

        return [CLSNAME]
    if source == "mvtec" or (source == "visa" and not (Path(root) / "split_csv").is_dir()):
        root = Path(root)
        return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())
    prepared = build_source(source, root, **(options or {}))
    return list(dict.fromkeys(r["clsname"] for r in prepared.train))
