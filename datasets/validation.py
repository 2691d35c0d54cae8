"""A pass over every manifest line before training starts, so a broken file fails in seconds
rather than hours in, with the file, the line and the expectation named.

Each image and mask is fully decoded (Pillow raises on truncated files, which OpenCV may
half-decode with only a warning). ``dataset.on_bad_file: skip`` drops bad records and lists them.
"""
import os
from collections import defaultdict

from PIL import Image
from tqdm import tqdm
from dualmem.utils.errors import UserError


class DataValidationError(UserError):
    pass


def _open(path, what):
    """(size (w, h), mode) of a fully decoded image, or raise with the reason."""
    if not os.path.isfile(path):
        raise DataValidationError(f"{what} not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.size, img.mode
    except Exception as exc:  # Pillow raises several types for broken files
        raise DataValidationError(f"{what} {path} cannot be decoded "
                                  f"({type(exc).__name__}: {exc})") from None


def validate_records(records, image_dir, source, color_mode="RGB", on_bad_file="error",
                     progress=False, logger=None):
    """Returns the records to use; raises DataValidationError listing every problem found
    (``on_bad_file: error``) or drops them with a warning listing each (``skip``)."""
    def full(name):
        return name if os.path.isabs(name) or not image_dir else os.path.join(image_dir, name)

    problems, keep = [], []
    modes = defaultdict(lambda: defaultdict(list))
    for i, rec in enumerate(tqdm(records, desc=f"checking {os.path.basename(str(source))}",
                                 disable=not progress, leave=False)):
        where = f"{source}, record {i + 1} ({rec.get('filename')})"
        try:
            size, mode = _open(full(rec["filename"]), "image")
            if rec.get("maskname"):
                msize, _ = _open(full(rec["maskname"]), "mask")
                if msize != size:
                    raise DataValidationError(
                        f"mask {full(rec['maskname'])} is {msize[0]}x{msize[1]} but its image "
                        f"is {size[0]}x{size[1]} (width x height); they must match")
        except DataValidationError as exc:
            problems.append(f"{where}: {exc}")
            continue
        modes[rec["clsname"]]["grey" if mode in ("L", "LA", "I", "I;16", "1") else
                              "colour"].append(rec["filename"])
        keep.append(rec)
    if color_mode != "GRAY":
        for cls, by_mode in modes.items():
            # a whole grey class (MVTec grid, screw, zipper) is expanded to RGB; a few grey
            # files in a colour class are almost always a data error
            if by_mode["grey"] and by_mode["colour"]:
                odd = set(by_mode["grey"])
                for name in sorted(odd)[:20]:
                    problems.append(f"{source}: image {full(name)} is greyscale but the other "
                                    f"{len(by_mode['colour'])} images of class '{cls}' are "
                                    f"colour ({color_mode} expected)")
                keep = [r for r in keep if r["filename"] not in odd]
    if problems:
        if on_bad_file == "skip":
            if logger:
                logger.warning(f"skipping {len(problems)} bad record(s) of {source}:\n  " +
                               "\n  ".join(problems))
            return keep, problems
        head = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataValidationError(
            f"{len(problems)} bad record(s) in {source}:\n  {head}{more}\n(fix them, set "
            f"dataset.on_bad_file: skip to leave them out, or dataset.validate: false to skip "
            f"this check)")
    return keep, problems


def check_classes(train_records, test_records, train_source, test_source):
    """Every class tested must have been trained on: an empty class is a data error."""
    train_classes = {r["clsname"] for r in train_records}
    test_classes = {r["clsname"] for r in test_records}
    missing = sorted(test_classes - train_classes)
    if missing:
        raise DataValidationError(
            f"class {', '.join(repr(c) for c in missing)} has test images in {test_source} but "
            f"no training images in {train_source}")
    unused = sorted(train_classes - test_classes)
    if unused:
        raise DataValidationError(
            f"class {', '.join(repr(c) for c in unused)} has training images in {train_source} "
            f"but no test images in {test_source}")
