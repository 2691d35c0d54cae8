"""Prediction over unlabelled image files (``tools/predict.py`` is its command line): find the
images, read and batch them, score and decide each through ``utils.detector.Detector.results``
(the one inference path: as ``--evaluate`` ran the model, its image-score rule and thresholds),
write ``predictions.csv``, per image a heat-map overlay and a mask, and ``index.html``, a
self-contained gallery of the overlays (``utils.report.gallery_html``).

An image's class (whose thresholds apply): the explicit class, else the checkpoint's only class,
else a folder name in the image's path (relative to the input) equal to a class of the
checkpoint (``<input>/bottle/x.png`` -> bottle); otherwise the 'global' thresholds. Unreadable
files get a row with ``error`` filled in; the rest are processed. A wrong ``--input`` (missing,
or holding no image file) is refused before anything is written.

Greyscale files follow training's rule (``datasets.validation``): a class whose images are all
grey is expanded to three channels (one note per run says which files); a grey file among
colour ones of its class is refused by name (an error row), as training refuses it.
"""
import csv
import os
import sys
from pathlib import Path

from dualmem.utils.errors import UserError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GREY_MODES = ("L", "LA", "I", "I;16", "1")   # Pillow modes training counts as greyscale
THUMB_WIDTH = 320                             # gallery thumbnails (pixels)
COLUMNS = ["file", "class", "score", "normalized_score", "is_anomalous", "threshold_from",
           "image_threshold", "pixel_threshold", "overlay", "mask", "error"]


def find_images(path, exclude=None):
    """(absolute path, relative name) pairs: the file itself, or image files under a folder
    (not those under ``exclude``, the output folder: its overlays are no input)."""
    path = Path(path)
    if path.is_file():
        return [(path, path.name)]
    if not path.is_dir():
        raise FileNotFoundError(f"--input not found: {path}")
    skip = Path(exclude).resolve() if exclude else None
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                   and not (skip and p.resolve().is_relative_to(skip)))
    return [(p, p.relative_to(path).as_posix()) for p in files]


def grey_rule(items, color_mode):
    """Training's rule for greyscale files, per class: (``{rel: error}`` for a grey file among
    colour ones, a one-line note naming the grey files of all-grey classes or None).
    ``items``: [(path, rel, class)]."""
    from PIL import Image

    if color_mode == "GRAY":
        return {}, None
    by_class = {}
    for path, rel, cls in items:
        try:
            with Image.open(path) as img:
                mode = img.mode
        except Exception:  # an unreadable file: read_image reports it
            continue
        kinds = by_class.setdefault(cls, {"grey": [], "colour": []})
        kinds["grey" if mode in GREY_MODES else "colour"].append(rel)
    refused, expanded = {}, []
    for cls, kinds in by_class.items():
        if kinds["grey"] and kinds["colour"]:
            for rel in kinds["grey"]:
                refused[rel] = (f"greyscale image, but the other {len(kinds['colour'])} images "
                                f"of class '{cls or 'unknown'}' in --input are colour "
                                f"({color_mode} expected); training refuses such a file as a "
                                f"data error: convert it, or predict it on its own")
        else:
            expanded += kinds["grey"]
    note = None if not expanded else (
        f"note: {len(expanded)} greyscale image(s) ({', '.join(expanded[:3])}"
        f"{', ...' if len(expanded) > 3 else ''}) expanded to three channels, as training does "
        f"for a greyscale class (a model trained on colour images may find them anomalous)")
    return refused, note


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
        raise UserError(f"--class_name '{class_name}' is not a class of the model in "
                        f"{detector.checkpoint}: it has thresholds for "
                        f"{', '.join(per_class) or 'no class'}")
    if not detector.thresholds and (threshold is None or pixel_threshold is None):
        raise UserError(f"{detector.checkpoint} holds no thresholds (it was saved before any "
                        f"evaluation); pass --threshold and --pixel_threshold")
    stored = (detector.thresholds or {}).get("epoch")
    if stored not in (None, detector.epoch):
        print(f"warning: the thresholds in {detector.checkpoint} come from the evaluation at "
              f"epoch {stored}, the weights from epoch {detector.epoch}", file=sys.stderr)


def predict_files(detector, input_path, output, class_name=None, threshold=None,
                  pixel_threshold=None, batch_size=None, normalize=None, images=True,
                  progress=False):
    """Predict every image file of ``input_path`` (a file, or a folder searched recursively) into
    ``output``: ``predictions.csv`` (rows of :data:`COLUMNS`), and unless ``images`` is false
    ``overlays/<rel>.png`` (heat map over the image at its size, colour bar, heading: class,
    verdict, score, threshold), ``masks/<rel>.png`` (0/255, ``map >= pixel threshold``) and the
    gallery ``index.html``. ``normalize``: heat-map colouring, 'global' (the class's fixed scale,
    its threshold at the middle of the bar: ``utils.drawing.calibrated_range``) or 'per_image'
    (default: ``evaluator.vis.normalize``). ``progress``: a progress bar. Returns the rows."""
    import cv2
    import numpy as np
    import torch
    from tqdm import tqdm

    from dualmem.datasets.image_io import ImageReadError, read_image
    from dualmem.utils.detector import preprocess
    from dualmem.utils.report import GALLERY_NAME, data_uri, gallery_html
    from dualmem.utils.visualize import annotated_overlay, calibrated_range, vis_settings, write_png

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
    files = find_images(input_path, exclude=out_dir)  # a wrong --input: nothing written
    if not files:
        raise UserError(f"no image files ({', '.join(EXTENSIONS)}) under --input {input_path}; "
                        f"nothing was written")
    items = [(path, rel, class_of(rel, class_name, classes)) for path, rel in files]
    refused, note = grey_rule(items, spec.color_mode)
    if note:
        print(note, file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, thumbs = [], {}
    reduction = detector.score_cfg.get("reduction", "max")
    bar = tqdm(total=len(items), desc="predicting", unit="image", disable=not progress,
               dynamic_ncols=True)

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
        bar.update(len(batch))

    def write_pictures(row, b, res):
        lo, hi, mark = calibrated_range({"map_min": res.map_range[0],
                                         "map_max": res.map_range[1]},
                                        res.image_threshold, res.pixel_threshold, reduction)
        if normalize != "global":
            lo, hi = None, None
        picture = annotated_overlay(
            b["display"], res.anomaly_map, lo, hi, threshold=res.image_threshold,
            score=res.score, verdict=res.is_anomalous, pixel_threshold=res.pixel_threshold,
            alpha=vis["alpha"], name=row["class"], mark=mark)
        row["overlay"] = write_png(out_dir / "overlays" / b["out_name"],
                                   picture).relative_to(out_dir).as_posix()
        w = min(THUMB_WIDTH, picture.shape[1])
        thumbs[row["file"]] = data_uri(cv2.resize(
            picture, (w, max(1, round(picture.shape[0] * w / picture.shape[1]))),
            interpolation=cv2.INTER_AREA))
        if res.mask is not None:
            row["mask"] = write_png(out_dir / "masks" / b["out_name"],
                                    res.mask.astype(np.uint8) * 255).relative_to(
                                        out_dir).as_posix()

    batch, used = [], set()
    for path, rel, cls in items:
        row = {"file": rel, "class": cls}
        rows.append(row)
        out_name = Path(rel).with_suffix(".png").as_posix()
        if out_name in used:  # x.png and x.jpg side by side: keep both
            out_name = rel + ".png"
        used.add(out_name)
        try:
            if rel in refused:
                raise ImageReadError(refused[rel])
            img = read_image(path, spec.color_mode)
        except ImageReadError as exc:
            row["error"] = str(exc)
            bar.update(1)
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
    bar.close()
    write_csv(out_dir / "predictions.csv", rows)
    if images:
        write_gallery(out_dir / GALLERY_NAME, rows, thumbs, detector, gallery_html)
    return rows


def summary(rows):
    """'N images: a anomalous, b normal, c failed' (and how many had no verdict)."""
    failed = sum(1 for r in rows if r.get("error"))
    flagged = sum(1 for r in rows if r.get("is_anomalous") == 1 and not r.get("error"))
    normal = sum(1 for r in rows if r.get("is_anomalous") == 0 and not r.get("error"))
    undecided = len(rows) - failed - flagged - normal
    return (f"{len(rows)} images: {flagged} anomalous, {normal} normal, {failed} failed" +
            (f", {undecided} without a verdict" if undecided else ""))


def write_gallery(path, rows, thumbs, detector, render):
    """``index.html`` beside ``predictions.csv``, written atomically."""
    from dualmem.utils.report import gallery_rank_key

    key = gallery_rank_key(rows)
    order = sorted(rows, key=lambda r: -float(r[key]) if r.get(key) not in (None, "")
                   else float("inf"))
    page = render(f"Predictions of {Path(str(detector.checkpoint)).as_posix()}", order, thumbs,
                  summary(rows) + "; colours on each class's fixed scale, the black line of "
                  "the colour bar is its threshold")
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
