"""MVTec-AD layout (``<cls>/train/good``, ``<cls>/test/<defect>``, ``<cls>/ground_truth``).

Also the layout VisA, MPDD, BTAD and most other benchmarks are converted into, so this is the
default source for ``--data_root``.
"""
from pathlib import Path

from dualmem.datasets.manifest import IMAGE_EXTENSIONS, MASK_SUFFIX
from dualmem.datasets.prepare.common import Prepared, PrepareError, stat_fingerprint
from dualmem.utils.errors import UserError


def _images(folder):
    """Image files of a folder, sorted by name so record order does not depend on the filesystem."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def _rel(path, root):
    return path.relative_to(root).as_posix()


def _find_mask(root, cls, defect, image):
    """The mask of a test image: ``ground_truth/<defect>/<stem>_mask.png`` (MVTec/UniAD) or
    ``<stem>.png`` (VisA converted to MVTec layout); other extensions tolerated."""
    gt_dir = root / cls / "ground_truth" / defect
    for stem in (f"{image.stem}{MASK_SUFFIX}", image.stem):
        for ext in (".png", image.suffix, image.suffix.lower()):
            cand = gt_dir / f"{stem}{ext}"
            if cand.is_file():
                return cand
    return None


def build_mvtec_records(root, classes=None):
    """Scan an MVTec-AD-layout tree into UniAD (train_records, test_records).

    ``classes=None`` takes every folder with a ``train`` subfolder, so extra files or folders in
    the root (manifests, READMEs) are ignored rather than mistaken for classes. Any number of
    defect folders is accepted. A defect folder without a ``ground_truth/<defect>`` folder gets
    no ``maskname`` (UniAD's rule: the whole image counts as anomalous); once that folder
    exists, every image of the defect must have its mask there, because a missing one is almost
    always a naming mistake that would silently turn a small defect into a whole-image one.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    available = sorted(p.name for p in root.iterdir()
                       if p.is_dir() and (p / "train").is_dir())
    if classes is None:
        if not available:
            raise UserError(f"no class folders (folders with a 'train' subfolder) in {root}; "
                            f"for a folder of your own images (good/, bad/, masks/) add "
                            f"--data_type folder")
        classes = available
    else:
        if isinstance(classes, str):
            classes = [classes]
        classes = list(classes)
        unknown = [c for c in classes if c not in available]
        if unknown:
            raise UserError(f"unknown class(es) {unknown} in {root}; available: {available}")

    train, test = [], []
    for cls in classes:
        train_dir = root / cls / "train"
        good_dirs = [train_dir / "good"] if (train_dir / "good").is_dir() else []
        train_imgs = [p for d in good_dirs for p in _images(d)]
        if not train_imgs:
            raise UserError(f"class '{cls}' has no training images in {train_dir / 'good'}")
        for p in train_imgs:
            train.append({"filename": _rel(p, root), "label": 0,
                          "label_name": "good", "clsname": cls})

        test_dir = root / cls / "test"
        n_test = len(test)
        subs = sorted(d for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []
        for sub in subs:
            good = sub.name == "good"
            has_gt = (root / cls / "ground_truth" / sub.name).is_dir()
            for p in _images(sub):
                rec = {"filename": _rel(p, root), "label": 0 if good else 1,
                       "label_name": "good" if good else "defective"}
                if not good:
                    mask = _find_mask(root, cls, sub.name, p)
                    if mask is not None:
                        rec["maskname"] = _rel(mask, root)
                    elif has_gt:
                        gt = root / cls / "ground_truth" / sub.name
                        raise UserError(f"test image {p} has no mask: expected "
                                         f"{gt / (p.stem + MASK_SUFFIX + '.png')} (or "
                                         f"{p.stem}.png there)")
                rec["clsname"] = cls
                test.append(rec)
        if len(test) == n_test:
            raise UserError(f"class '{cls}' has no test images in {test_dir} (expected "
                             f"test/good and test/<defect> folders)")
    return train, test


def is_mvtec_tree(root):
    root = Path(root)
    return root.is_dir() and any(p.is_dir() and (p / "train").is_dir() for p in root.iterdir())


def build(root, classes=None):
    root = Path(root).resolve()
    try:
        train, test = build_mvtec_records(root, classes)
    except FileNotFoundError as exc:
        raise PrepareError(str(exc)) from None
    except ValueError as exc:
        raise PrepareError(str(exc)) from None
    return Prepared(train, test, str(root), source=f"MVTec-layout tree {root}")


def fingerprint(root, classes=None):
    root = Path(root).resolve()
    return stat_fingerprint([root / c for c in classes] if classes else [root])
