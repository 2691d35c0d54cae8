"""Procedural MVTec-AD-style dataset: the framework's embedded demo, so nothing is downloaded.

Each class is a parametric scene (two objects, two textures) with modest per-image jitter in
pose, colour, lighting and sensor noise, so normal images are similar but never copies. Defects
are painted only inside a binary mask that is written as the ground truth, so masks equal the
defect region exactly. Defects are sized at roughly 5-20 % of the image side: large enough to
show up on a stride-16 feature map, small enough that the image is still mostly normal.

Everything is drawn from ``numpy.random.Generator``s seeded from (seed, class, split, defect,
index), so the same arguments give byte-identical PNGs and changing one count does not reshuffle
the other images. This module seeds and writes; the drawing lives in ``synthetic_render.py``
(scenes) and ``synthetic_defects.py`` (defects).

CLI: ``python tools/make_synthetic.py --out DIR [--seed S] [--classes disc weave ...]``
"""
import json
import shutil
import zlib
from pathlib import Path

import cv2
import numpy as np

from dualmem.datasets.manifest import write_manifest
from dualmem.datasets.prepare.mvtec import build_mvtec_records
from dualmem.datasets.synthetic_defects import apply_defect
from dualmem.datasets.synthetic_render import OBJECT, RENDERERS, TEXTURE
from dualmem.utils.errors import UserError

# Bump whenever the drawing code (synthetic_render.py, synthetic_defects.py) changes, so
# ensure_synthetic_dataset regenerates stale copies.
GENERATOR_VERSION = 2

CLASS_SPECS = {
    "disc": (OBJECT, ("scratch", "hole", "stain", "missing")),
    "bracket": (OBJECT, ("scratch", "hole", "contamination", "missing")),
    "weave": (TEXTURE, ("hole", "stain", "scratch", "missing")),
    "marble": (TEXTURE, ("crack", "stain", "hole", "contamination")),
}
DEFAULT_CLASSES = tuple(CLASS_SPECS)
DEFAULT_IMAGE_SIZE = 224
DEFAULT_NUM_TRAIN = 60
DEFAULT_NUM_TEST_GOOD = 10
DEFAULT_NUM_TEST_DEFECT = 4  # per defect type -> 10 + 4 * 4 = 26 test images per class

_SPLIT_CODES = {"train": 1, "test_good": 2, "test_defect": 3}
_DEFECT_CODES = {"scratch": 1, "hole": 2, "stain": 3, "missing": 4, "crack": 5,
                 "contamination": 6}
_COMPLETE = ".complete"
_STARTED = ".synthetic-generating"  # ours: a folder we may overwrite


# ----------------------------------------------------------------------------- one sample
def _rng(seed, cls, split, defect, idx):
    """Independent stream per image; crc32 because Python's str hash is salted per process."""
    key = [int(seed), zlib.crc32(cls.encode()), _SPLIT_CODES[split],
           _DEFECT_CODES.get(defect, 0), int(idx)]
    return np.random.default_rng(np.random.SeedSequence(key))


def _finish(rng, img):
    """Sensor noise after the defect, so defect pixels are not tellable by being noise-free."""
    img = img + rng.normal(0, 2.0, img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _write_png(path, arr):
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover
        raise IOError(f"PNG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def render_sample(cls, seed=0, split="train", defect=None, idx=0, image_size=DEFAULT_IMAGE_SIZE):
    """One image (BGR uint8) and its mask (uint8 0/255, or None) exactly as the generator makes it.

    Exposed so previews and tests can draw a sample without writing a dataset.
    """
    if cls not in CLASS_SPECS:
        raise UserError(f"unknown synthetic class '{cls}'; available: {list(CLASS_SPECS)}")
    if defect is not None and defect not in CLASS_SPECS[cls][1]:
        raise UserError(f"class '{cls}' has no defect '{defect}'; "
                         f"available: {list(CLASS_SPECS[cls][1])}")
    S = int(image_size)
    rng = _rng(seed, cls, split if defect is None else "test_defect", defect, idx)
    scene = RENDERERS[cls](rng, S)
    if defect is None:
        return _finish(rng, scene.image), None
    img, mask = apply_defect(rng, scene, defect, S)
    return _finish(rng, img), (mask.astype(np.uint8) * 255)


# ----------------------------------------------------------------------------- dataset
def _params(classes, image_size, num_train, num_test_good, num_test_defect, seed):
    if classes is None:
        classes = list(DEFAULT_CLASSES)
    elif isinstance(classes, str):
        classes = [classes]
    classes = list(classes)
    unknown = [c for c in classes if c not in CLASS_SPECS]
    if unknown:
        raise UserError(f"unknown synthetic class(es) {unknown}; available: {list(CLASS_SPECS)}")
    if len(set(classes)) != len(classes):
        raise UserError(f"duplicate classes in {classes}")
    if int(image_size) < 64:
        raise UserError(f"image_size must be >= 64, got {image_size}")
    for name, n in (("num_train", num_train), ("num_test_good", num_test_good),
                    ("num_test_defect", num_test_defect)):
        if int(n) < 0:
            raise UserError(f"{name} must be >= 0, got {n}")
    if int(num_train) < 1:
        raise UserError("num_train must be >= 1 (a class needs training images)")
    if int(seed) < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    return {"version": GENERATOR_VERSION, "classes": classes, "image_size": int(image_size),
            "num_train": int(num_train), "num_test_good": int(num_test_good),
            "num_test_defect": int(num_test_defect), "seed": int(seed)}


def generate_synthetic_dataset(root, classes=None, image_size=DEFAULT_IMAGE_SIZE,
                               num_train=DEFAULT_NUM_TRAIN, num_test_good=DEFAULT_NUM_TEST_GOOD,
                               num_test_defect=DEFAULT_NUM_TEST_DEFECT, seed=0, overwrite=False):
    """Write an MVTec-AD-layout dataset under ``root``; ``num_test_defect`` is per defect type.

    Existing class folders are an error unless ``overwrite`` (then only those folders are
    replaced), so a typo in ``root`` cannot wipe an unrelated directory.
    """
    p = _params(classes, image_size, num_train, num_test_good, num_test_defect, seed)
    root = Path(root)
    S = p["image_size"]
    if not overwrite:
        clash = [c for c in p["classes"] if (root / c).exists()]
        if clash:
            raise FileExistsError(f"class folder(s) {clash} already exist in {root}; "
                                  f"pass overwrite=True to replace them")
    root.mkdir(parents=True, exist_ok=True)
    (root / _COMPLETE).unlink(missing_ok=True)  # contents are about to change

    summary = {"root": str(root), "classes": list(p["classes"]), "image_size": S,
               "seed": p["seed"], "counts": {}, "defect_types": {}}
    for cls in p["classes"]:
        cdir = root / cls
        if cdir.exists():
            shutil.rmtree(cdir)
        defects = CLASS_SPECS[cls][1]
        (cdir / "train" / "good").mkdir(parents=True)
        (cdir / "test" / "good").mkdir(parents=True)
        for i in range(p["num_train"]):
            img, _ = render_sample(cls, p["seed"], "train", None, i, S)
            _write_png(cdir / "train" / "good" / f"{i:03d}.png", img)
        for i in range(p["num_test_good"]):
            img, _ = render_sample(cls, p["seed"], "test_good", None, i, S)
            _write_png(cdir / "test" / "good" / f"{i:03d}.png", img)
        for d in defects:
            if p["num_test_defect"] == 0:
                break
            (cdir / "test" / d).mkdir(parents=True)
            (cdir / "ground_truth" / d).mkdir(parents=True)
            for i in range(p["num_test_defect"]):
                img, mask = render_sample(cls, p["seed"], "test_defect", d, i, S)
                _write_png(cdir / "test" / d / f"{i:03d}.png", img)
                _write_png(cdir / "ground_truth" / d / f"{i:03d}_mask.png", mask)
        summary["defect_types"][cls] = list(defects)
        summary["counts"][cls] = {
            "train": p["num_train"], "test_good": p["num_test_good"],
            "test_defect": {d: p["num_test_defect"] for d in defects},
            "test_total": p["num_test_good"] + p["num_test_defect"] * len(defects)}
    return summary


def ensure_synthetic_dataset(root, force=False, **kwargs):
    """Generate (and write train.json / test.json) unless a complete copy with equal params exists.

    The ``.complete`` marker is written last, so an interrupted run is simply redone next time.
    Not safe for several processes generating the same root at once: let rank 0 call it.
    """
    root = Path(root)
    p = _params(kwargs.pop("classes", None), kwargs.pop("image_size", DEFAULT_IMAGE_SIZE),
                kwargs.pop("num_train", DEFAULT_NUM_TRAIN),
                kwargs.pop("num_test_good", DEFAULT_NUM_TEST_GOOD),
                kwargs.pop("num_test_defect", DEFAULT_NUM_TEST_DEFECT), kwargs.pop("seed", 0))
    if kwargs:
        raise TypeError(f"unexpected argument(s) {sorted(kwargs)}")
    marker = root / _COMPLETE
    done = False
    if not force and marker.is_file():
        try:
            done = json.loads(marker.read_text()) == p
        except (OSError, ValueError):
            done = False
        done = done and all((root / c / "train" / "good").is_dir() for c in p["classes"]) \
            and (root / "train.json").is_file() and (root / "test.json").is_file()
    if done:
        return root
    ours = root / _STARTED
    if root.is_dir() and any(root.iterdir()) and not (marker.is_file() or ours.is_file()):
        # generating overwrites class folders and manifests: never in a folder of other data
        raise UserError(
            f"dataset.synthetic.root {root} holds files that are not a DualMem synthetic "
            f"dataset (no {_COMPLETE} or {_STARTED} marker); refusing to write into it. Point "
            f"dataset.synthetic.root at a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    ours.write_text("generation started; .complete is written when it ends\n")
    marker.unlink(missing_ok=True)
    generate_synthetic_dataset(root, p["classes"], p["image_size"], p["num_train"],
                               p["num_test_good"], p["num_test_defect"], p["seed"],
                               overwrite=True)
    train, test = build_mvtec_records(root, p["classes"])
    write_manifest(root / "train.json", train)
    write_manifest(root / "test.json", test)
    tmp = root / (_COMPLETE + ".tmp")
    tmp.write_text(json.dumps(p, indent=1) + "\n")
    tmp.replace(marker)
    ours.unlink(missing_ok=True)
    return root
