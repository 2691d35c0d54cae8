"""A user's own images: a folder of good ones, optionally defective ones and their masks.

Good images are split into train/test by ``test_split`` (seeded); every defective image goes to
the test set. Masks are matched by name (``<stem>_mask.<ext>`` or ``<stem>.<ext>``, same
sub-folder as the defective image or flat). Paths are written relative to the folders' common
parent, which becomes the ``image_dir``.
"""
import os
from pathlib import Path

import numpy as np

from dualmem.datasets.manifest import IMAGE_EXTENSIONS, MASK_SUFFIX
from dualmem.datasets.prepare.common import Prepared, PrepareError, stat_fingerprint


def _images(folder, what):
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise PrepareError(f"{what} folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                   and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise PrepareError(f"{what} folder {folder} has no images "
                           f"({', '.join(IMAGE_EXTENSIONS)})")
    return folder, files


def _mask_for(image, bad_dir, mask_dir):
    rel_parent = image.parent.relative_to(bad_dir)
    for d in (mask_dir / rel_parent, mask_dir):
        for stem in (f"{image.stem}{MASK_SUFFIX}", image.stem):
            for ext in (".png", image.suffix, ".bmp", ".tif", ".tiff", ".jpg"):
                cand = d / f"{stem}{ext}"
                if cand.is_file():
                    return cand
    return None


def build(good, bad=None, masks=None, test_split=0.2, seed=0, class_name=None, root=None):
    if not 0.0 <= float(test_split) < 1.0:
        raise PrepareError(f"test_split must be in [0, 1), got {test_split}")
    if masks and not bad:
        raise PrepareError("masks were given without a folder of defective images (--bad)")
    good_dir, good_files = _images(good, "good")
    bad_dir, bad_files = _images(bad, "defective") if bad else (None, [])
    mask_dir = Path(masks).resolve() if masks else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise PrepareError(f"mask folder not found: {mask_dir}")
    dirs = [d for d in (good_dir, bad_dir, mask_dir) if d is not None]
    root = Path(root).resolve() if root else Path(os.path.commonpath([str(d) for d in dirs]))
    for d in dirs:
        try:
            d.relative_to(root)
        except ValueError:
            raise PrepareError(f"{d} is not inside the image root {root}") from None
    # default class name: the folder holding good/ (and bad/), e.g. .../screws/good -> screws
    cls = class_name or (good_dir.parent.name if root == good_dir else root.name)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(good_files))
    n_test = int(round(float(test_split) * len(good_files)))
    test_idx = set(order[:n_test].tolist())
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    train = [{"filename": rel(p), "label": 0, "label_name": "good", "clsname": cls}
             for i, p in enumerate(good_files) if i not in test_idx]
    if not train:
        raise PrepareError(f"no training images left in {good_dir} with test_split "
                           f"{test_split} ({len(good_files)} good images)")
    test = [{"filename": rel(p), "label": 0, "label_name": "good", "clsname": cls}
            for i, p in enumerate(good_files) if i in test_idx]
    for p in bad_files:
        rec = {"filename": rel(p), "label": 1, "label_name": "defective"}
        if mask_dir is not None:
            if mask_dir == bad_dir:
                raise PrepareError("the mask folder must differ from the defective folder")
            m = _mask_for(p, bad_dir, mask_dir)
            if m is None:
                raise PrepareError(f"defective image {p} has no mask in {mask_dir} (expected "
                                   f"{p.stem}{MASK_SUFFIX}.png or {p.stem}.png)")
            rec["maskname"] = rel(m)
        rec["clsname"] = cls
        test.append(rec)
    return Prepared(train, test, str(root), source=f"image folders under {root}")


def fingerprint(good, bad=None, masks=None, **_):
    return stat_fingerprint([p for p in (good, bad, masks) if p])
