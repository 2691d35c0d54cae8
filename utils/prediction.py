"""Prediction over unlabelled image files (``tools/predict.py`` is its command line): find the
images, read and batch them, score and decide each through ``utils.detector.Detector.results``
(the one inference path: as ``--evaluate`` ran the model, its image-score rule and thresholds),
write ``predictions.csv`` and, per image, a heat-map overlay and a mask.

An image's class (whose thresholds apply): the explicit class, else the checkpoint's only class,
else a folder name in the image's path (relative to the input) equal to a class of the
checkpoint (``<input>/bottle/x.png`` -> bottle); otherwise the 'global' thresholds. Unreadable
files get a row with ``error`` filled in; the rest are processed.
"""
import csv
import os
import sys
from pathlib import Path

from utils.errors import UserError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
COLUMNS = ["file", "class", "score", "normalized_score", "is_anomalous", "threshold_from",
           "image_threshold", "pixel_threshold", "overlay", "mask", "error"]


def find_images(path):
    """(absolute path, relative name) pairs: the file itself, or image files under a folder."""
    path = Path(path)
    if path.is_file():
        return [(path, path.name)]
    if not path.is_dir():
        raise FileNotFoundError(f"--input not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    return [(p, p.relative_to(path).as_posix()) for p in files]


def class_of(rel, explicit, classes):
    """The explicit class, the checkpoint's single class, or a path component naming a class."""
    if explicit:
        return explicit
    if len(classes) == 1:
        return classes[0]
    for part in Path(rel).parts[:-1]:
        if part in classes:
            return part
    return None


def write_csv(path, rows):
    """``predictions.csv`` (:data:`COLUMNS`), written atomically; None as an empty cell."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    os.replace(tmp, path)


def check_thresholds(detector, class_name=None, threshold=None, pixel_threshold=None):
    """Refuse what cannot be decided: an unknown ``class_name``, or no stored thresholds and no
    explicit pair. Warns when the thresholds come from another epoch than the weights."""
    per_class = (detector.thresholds or {}).get("per_class") or {}
    if class_name and detector.thresholds and class_name not in per_class:
        raise UserError(f"--class_name '{class_name}' has no thresholds in "
                        f"{detector.checkpoint} (classes there: {', '.join(per_class)})")
    if not detector.thresholds and (threshold is None or pixel_threshold is None):
        raise UserError(f"{detector.checkpoint} holds no thresholds (it was saved before any "
                        f"evaluation); pass --threshold and --pixel_threshold")
    stored = (detector.thresholds or {}).get("epoch")
    if stored not in (None, detector.epoch):
        print(f"warning: the thresholds in {detector.checkpoint} come from the evaluation at "
              f"epoch {stored}, the weights from epoch {detector.epoch}", file=sys.stderr)


def predict_files(detector, input_path, output, class_name=None, threshold=None,
                  pixel_threshold=None, batch_size=None, normalize=None, images=True):
    """Predict every image file of ``input_path`` (a file, or a folder searched recursively) into
    ``output``: ``predictions.csv`` (rows of :data:`COLUMNS`), and unless ``images`` is false
    ``overlays/<rel>.png`` (heat map over the image at its size, colour bar, heading: class,
    score, threshold, verdict) and ``masks/<rel>.png`` (0/255, ``map >= pixel threshold``).
    ``normalize``: heat-map colouring, 'global' (the class's map range in the evaluation) or
    'per_image' (default: ``evaluator.vis.normalize``). Returns the rows."""
    import cv2
    import numpy as np
    import torch

    from datasets.image_io import ImageReadError, read_image
    from utils.detector import preprocess
    from utils.visualize import annotated_overlay, vis_settings, write_png

    check_thresholds(detector, class_name, threshold, pixel_threshold)
    vis = vis_settings(detector.cfg)
    normalize = normalize or vis["normalize"]
    ds = detector.cfg.dataset
    if batch_size is None:
        batch_size = int(ds.get("test_batch_size") or ds.get("batch_size", 8))
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    spec, classes = detector.spec, detector.classes
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = find_images(input_path)
    rows = []

    def flush(batch):
        results = detector.results(torch.stack([b["tensor"] for b in batch]),
                                   [b["row"]["class"] for b in batch],
                                   sizes=[b["hw"] for b in batch] if images else None,
                                   threshold=threshold, pixel_threshold=pixel_threshold)
        for b, res in zip(batch, results):
            row = b["row"]
            norm = res.normalized_score
            row.update(score=repr(res.score), threshold_from=res.threshold_from,
                       normalized_score=None if norm is None else f"{norm:.6f}",
                       is_anomalous=None if res.is_anomalous is None else int(res.is_anomalous),
                       image_threshold=res.image_threshold, pixel_threshold=res.pixel_threshold)
            if images:
                try:
                    write_pictures(row, b, res)
                except OSError as exc:
                    row["error"] = str(exc)

    def write_pictures(row, b, res):
        lo, hi = res.map_range if normalize == "global" else (None, None)
        picture = annotated_overlay(
            b["display"], res.anomaly_map, lo, hi, threshold=res.image_threshold,
            score=res.score, verdict=res.is_anomalous, pixel_threshold=res.pixel_threshold,
            alpha=vis["alpha"], name=row["class"])
        row["overlay"] = write_png(out_dir / "overlays" / b["out_name"],
                                   picture).relative_to(out_dir).as_posix()
        if res.mask is not None:
            row["mask"] = write_png(out_dir / "masks" / b["out_name"],
                                    res.mask.astype(np.uint8) * 255).relative_to(
                                        out_dir).as_posix()

    batch, used = [], set()
    for path, rel in files:
        row = {"file": rel, "class": class_of(rel, class_name, classes)}
        rows.append(row)
        out_name = Path(rel).with_suffix(".png").as_posix()
        if out_name in used:  # x.png and x.jpg side by side: keep both
            out_name = rel + ".png"
        used.add(out_name)
        try:
            img = read_image(path, spec.color_mode)
        except ImageReadError as exc:
            row["error"] = str(exc)
            continue
        display = img if spec.color_mode == "RGB" else cv2.cvtColor(
            img, cv2.COLOR_BGR2RGB if spec.color_mode == "BGR" else cv2.COLOR_GRAY2RGB)
        batch.append({"row": row, "hw": img.shape[:2], "display": display, "out_name": out_name,
                      "tensor": preprocess(img, spec)})
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    write_csv(out_dir / "predictions.csv", rows)
    return rows
