"""CIFAR-10 as an anomaly-detection benchmark (UniAD's protocol), as manifests.

Normal classes form one unified "class" (``clsname`` ``cifar10``): train = their training
images; test = their test images plus an equal number of test images drawn at random (by seed)
from the other classes, labelled 1. No masks, so only image metrics mean anything. Sources: the
official ``cifar-10-batches-py`` pickles (exported once to PNG files, which the ordinary
manifest dataset then reads) or a class-folder tree ``train|test/<class name>/*.png|jpg``.
"""
import pickle
from pathlib import Path

import numpy as np

from dualmem.datasets.manifest import IMAGE_EXTENSIONS
from dualmem.datasets.prepare.common import Prepared, PrepareError, short_hash, stat_fingerprint

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
SPLITS = ("01234", "56789", "02468", "13579")  # UniAD's four normal-class sets
CLSNAME = "cifar10"
PICKLE_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


def normal_class_indices(normal_classes):
    """Indices 0-9 from ints, names or a split string like '01234'."""
    if isinstance(normal_classes, str):
        if normal_classes.isdigit():
            normal_classes = [int(c) for c in normal_classes]
        else:
            normal_classes = [c.strip() for c in normal_classes.split(",") if c.strip()]
    if not normal_classes:
        raise PrepareError("CIFAR-10: no normal classes given (e.g. 0 1 2 3 4)")
    out = []
    for c in normal_classes:
        if isinstance(c, str) and c.isdigit():
            c = int(c)
        if isinstance(c, bool) or (isinstance(c, int) and not 0 <= c < 10):
            raise PrepareError(f"CIFAR-10 normal class {c!r} out of range: use 0-9 or a name "
                               f"({', '.join(CLASSES)})")
        if isinstance(c, str):
            if c not in CLASSES:
                raise PrepareError(f"unknown CIFAR-10 class name {c!r}; valid: "
                                   f"{', '.join(CLASSES)}")
            c = CLASSES.index(c)
        if not isinstance(c, int):
            raise PrepareError(f"CIFAR-10 normal class must be an int or a name, got {c!r}")
        if c in out:
            raise PrepareError(f"CIFAR-10 normal class {CLASSES[c]} ({c}) given twice")
        out.append(c)
    if len(out) == len(CLASSES):
        raise PrepareError("CIFAR-10: all ten classes are normal, nothing is anomalous")
    return sorted(out)


def find_layout(root):
    """('pickle', dir) or ('tree', dir); a root holding exactly one such folder is entered."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise PrepareError(f"CIFAR-10 root not found: {root}")
    for cand in (root, root / PICKLE_DIR):
        if (cand / TRAIN_BATCHES[0]).is_file():
            return "pickle", cand
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "tree", root
    subs = [p for p in root.iterdir() if p.is_dir() and (p / "train").is_dir()
            and (p / "test").is_dir()]
    if len(subs) == 1:
        return "tree", subs[0]
    raise PrepareError(f"{root} holds neither the CIFAR-10 pickles ({PICKLE_DIR}/"
                       f"{TRAIN_BATCHES[0]}) nor a class-folder tree (train/<class>/, "
                       f"test/<class>/)")


# What the official batches need to be rebuilt: numpy arrays (their reconstructor, class and
# dtype). A pickle naming anything else could run code, so it is refused by name.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol 2 stores bytes when written by Python 3
}


class _BatchUnpickler(pickle.Unpickler):
    """Admits only the official structure: dicts, lists, bytes/str and numpy arrays."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names '{module}.{name}', which a CIFAR-10 batch never "
                                     f"holds (only numpy arrays, lists, dicts, bytes); refused "
                                     f"without loading it")


def _load_batch(path):
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise PrepareError(f"CIFAR-10 batch not found: {path}") from None
    except Exception as exc:  # unpickling raises many types on a corrupt file
        raise PrepareError(f"cannot read CIFAR-10 batch {path}: {exc}") from None
    if not isinstance(d, dict):
        raise PrepareError(f"{path}: not a CIFAR-10 batch (a pickled {type(d).__name__}, "
                           f"expected a dict)")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise PrepareError(f"{path}: not a CIFAR-10 batch (keys {sorted(d)})")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise PrepareError(f"{path}: expected N x 3072 uint8 data and N labels, got "
                           f"{data.shape} and {labels.shape}")
    # rows are channel-major 3x32x32 (R plane, G plane, B plane)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def export_pickles(pickle_dir, out_dir):
    """Write the pickled images once as ``<split>/<class>/NNNNN.png`` under ``out_dir``."""
    import cv2

    out_dir = Path(out_dir)
    marker = out_dir / ".complete"
    stamp = stat_fingerprint([Path(pickle_dir) / n for n in (*TRAIN_BATCHES, TEST_BATCH)])
    if marker.is_file() and marker.read_text().strip() == stamp:
        return out_dir
    for split, names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
        counters = [0] * len(CLASSES)
        for c in CLASSES:
            (out_dir / split / c).mkdir(parents=True, exist_ok=True)
        for name in names:
            images, labels = _load_batch(Path(pickle_dir) / name)
            for img, lab in zip(images, labels):
                if not 0 <= lab < 10:
                    raise PrepareError(f"{Path(pickle_dir) / name}: label {lab} out of range")
                path = out_dir / split / CLASSES[lab] / f"{counters[lab]:05d}.png"
                counters[lab] += 1
                if not cv2.imwrite(str(path), np.ascontiguousarray(img[:, :, ::-1])):
                    raise PrepareError(f"cannot write {path}")
    marker.write_text(stamp + "\n")
    return out_dir


def _tree_images(tree, split):
    per_class = []
    for c in CLASSES:
        d = tree / split / c
        if not d.is_dir():
            raise PrepareError(f"CIFAR-10 class folder missing: {d} (expected one folder per "
                               f"class: {', '.join(CLASSES)})")
        files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise PrepareError(f"CIFAR-10 class folder {d} has no images")
        per_class.append(files)
    return per_class


def _rec(path, tree, label, cls_index):
    return {"filename": path.relative_to(tree).as_posix(), "label": label,
            "label_name": "defective" if label else "good", "clsname": CLSNAME,
            "specie_name": CLASSES[cls_index]}


def build(root, normal_classes=(0, 1, 2, 3, 4), seed=0, export_dir=None):
    """UniAD's protocol for one normal-class set; ``export_dir`` receives PNGs from pickles."""
    normal = normal_class_indices(normal_classes)
    kind, where = find_layout(root)
    if kind == "pickle":
        if export_dir is None:
            raise PrepareError("CIFAR-10 pickles must be exported to image files first: give "
                               "an output folder")
        tree = export_pickles(where, export_dir)
    else:
        tree = where
    train_files, test_files = _tree_images(tree, "train"), _tree_images(tree, "test")
    train = [_rec(p, tree, 0, c) for c in normal for p in train_files[c]]
    test_normal = [_rec(p, tree, 0, c) for c in normal for p in test_files[c]]
    pool = [(c, p) for c in range(len(CLASSES)) if c not in normal for p in test_files[c]]
    n_anom = min(len(test_normal), len(pool))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(pool), size=n_anom, replace=False))
    test_anom = [_rec(pool[i][1], tree, 1, pool[i][0]) for i in pick]
    prepared = Prepared(train, test_normal + test_anom, str(tree),
                        source=f"CIFAR-10 {kind} {where}, normal "
                               f"{''.join(str(c) for c in normal)}, seed {seed}")
    if n_anom < len(test_normal):
        prepared.notes.append(f"only {n_anom} anomalous test images exist for "
                              f"{len(test_normal)} normal ones")
    return prepared


def export_key(root):
    return f"cifar10_png-{short_hash(str(Path(root).resolve()), 8)}"


def fingerprint(root, normal_classes=None, seed=0, export_dir=None):
    kind, where = find_layout(root)
    if kind == "pickle":
        return stat_fingerprint([where / n for n in (*TRAIN_BATCHES, TEST_BATCH)])
    return stat_fingerprint([where / "train", where / "test"])
