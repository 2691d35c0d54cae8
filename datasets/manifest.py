"""UniAD JSON-lines manifests: one record per image, paths relative to the dataset root.

UniAD's data loaders read ``{"filename", "label", "label_name", "maskname", "clsname"}`` lines;
keeping that exact format lets configs and manifests move between this framework and UniAD.
Errors name file and line because a hand-edited manifest with one bad line is the usual failure.
"""
import json
import os
import tempfile
from pathlib import Path
from dualmem.utils.errors import UserError

REQUIRED_KEYS = ("filename", "label", "clsname")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"


def _check_record(rec, where):
    """Validate one record; ``where`` is a 'file, line N' prefix for the message."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in REQUIRED_KEYS:
        if key not in rec:
            raise UserError(f"{where}: missing required key '{key}' "
                             f"(required: {', '.join(REQUIRED_KEYS)})")
    for key in ("filename", "clsname"):
        if not isinstance(rec[key], str) or not rec[key]:
            raise UserError(f"{where}: '{key}' must be a non-empty string, got {rec[key]!r}")
    check_class_name(rec["clsname"], f"{where}: 'clsname'")
    label = rec["label"]
    # bool is an int subclass; JSON true would silently read as label 1.
    if isinstance(label, bool) or label not in (0, 1):
        raise UserError(f"{where}: 'label' must be 0 (good) or 1 (defective), got {label!r}")
    for key in ("label_name", "maskname"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise UserError(f"{where}: '{key}' must be a string, got {rec[key]!r}")


def check_class_name(name, where):
    """A class name becomes a folder name (a per-class run's class folder, ``vis/<class>/``),
    so one that is a path ('../x', '/tmp/x') would make a tool write outside its folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(
            c in name for c in "/\\\0"):
        raise UserError(f"{where} {name!r} is not a valid class name: it must be a folder "
                        f"name, without '/', '\\' or NUL, and not '.' or '..'")


def read_manifest(path):
    """Read a UniAD JSON-lines manifest into a list of dicts (blank lines are skipped)."""
    path = Path(path)
    records = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            _check_record(rec, where)
            records.append(rec)
    return records


def write_manifest(path, records):
    """Write records as JSON lines atomically, so a crash never leaves a truncated manifest."""
    path = Path(path)
    records = list(records)
    for i, rec in enumerate(records):
        _check_record(rec, f"record {i} for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(rec) + "\n" for rec in records))


def write_text_atomic(path, text):
    """A unique temp file in the same folder, fsync, then ``os.replace``: readers see the old
    file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ----------------------------------------------------------------------------- file identity
ANY_CLASS = "*"  # a name recorded without its class (an older run): matches it in any class


def root_folders(roots):
    """The folders data roots stand for (an ADer ``meta.json`` root: its folder), longest
    first so a root nested in another claims its own files."""
    if not roots:
        return []
    roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
    folders = [str(Path(r).parent if str(r).endswith(".json") else Path(r)) for r in roots]
    return sorted(folders, key=len, reverse=True)


def relative_name(filename, roots=()):
    """A file's name relative to the data root holding it: a manifest name as it is (already
    relative to its root), an absolute one (several roots merged) relative to its root. The
    same image keeps its name when the data moves to another folder."""
    name = str(filename)
    if os.path.isabs(name):
        for folder in root_folders(roots):
            path = Path(name)
            if path.is_relative_to(folder):
                return path.relative_to(folder).as_posix()
    return Path(name).as_posix()


def file_id(record, roots=()):
    """(class, name relative to its data root): how the leak guard and the data fingerprint
    identify an image, independent of where the data lies."""
    return str(record["clsname"]), relative_name(record["filename"], roots)


def group_ids(ids):
    """``{class: [names]}`` (sorted): the JSON form of a set of file ids."""
    out = {}
    for cls, name in sorted(set(ids)):
        out.setdefault(cls, []).append(name)
    return out


def ungroup_ids(grouped):
    """The set of file ids of a ``group_ids`` mapping (None or {} give an empty set)."""
    return {(cls, name) for cls, names in (grouped or {}).items() for name in names}


def ids_matching(records, ids, roots=()):
    """Names (relative to their roots) of the records whose id is in ``ids``; an id recorded
    without a class (``ANY_CLASS``) matches its name in any class."""
    anywhere = {name for cls, name in ids if cls == ANY_CLASS}
    hits = []
    for r in records:
        cls, name = file_id(r, roots)
        if (cls, name) in ids or name in anywhere:
            hits.append(name)
    return sorted(set(hits))


def data_summary(train_records, test_records, image_dir=None, roots=(), skipped=None):
    """Per class: training and test image counts, a fingerprint of the test files (names
    relative to their roots and byte sizes, so a resized copy of the data or an added image
    changes it, a moved folder does not) and the files ``dataset.on_bad_file: skip`` left out.

    ``skipped``: {"train": records, "test": records} dropped by ``dataset.on_bad_file: skip``.
    """
    import hashlib

    def size(name):
        path = name if os.path.isabs(name) or not image_dir else os.path.join(image_dir, name)
        try:
            return os.path.getsize(path)
        except OSError:
            return -1  # unreadable here; still part of the list

    out = {}
    for cls in sorted({r["clsname"] for r in list(train_records) + list(test_records)}):
        lines = sorted(f"{file_id(r, roots)[1]}\t{size(str(r['filename']))}"
                       for r in test_records if r["clsname"] == cls)
        digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:12]
        out[cls] = {"train": sum(r["clsname"] == cls for r in train_records),
                    "test": len(lines), "test_files": digest,
                    "skipped": [f"{split}: {file_id(r, roots)[1]}"
                                for split in ("train", "test")
                                for r in (skipped or {}).get(split) or []
                                if r["clsname"] == cls]}
    return out
