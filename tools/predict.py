"""Anomaly scores, heat maps and masks for unlabelled images, from a checkpoint alone.

    python tools/predict.py --checkpoint RUN/checkpoints/last.pth --input FILE_OR_DIR \
        --output OUT [--class_name C] [--threshold X] [--pixel_threshold Y] [--device cpu]

The model is rebuilt from the config stored in the checkpoint (backbone ``pretrained`` forced
off: every weight comes from the checkpoint, nothing is downloaded) with the checkpoint's input
size, pixel mean/std and image-score rule, so a score equals the one ``--evaluate`` reports for
the same file. A folder is searched recursively for image files (by extension).

Outputs under ``--output``: ``overlays/<rel>.png`` (heat map over the image, original size, with a colour bar and
a heading: class, score, threshold, verdict),
``masks/<rel>.png`` (0/255, ``map >= pixel threshold``) and ``predictions.csv`` with columns
file, class, score, normalized_score, is_anomalous, threshold_from, image_threshold,
pixel_threshold, overlay, mask, error. ``normalized_score`` maps the decision threshold to 0.5
(``utils.evaluator.normalized_score``).

Which thresholds (stored in the checkpoint by the last evaluation during training):
  1. ``--threshold`` / ``--pixel_threshold`` always win (raw score / map units);
  2. the image's class: ``--class_name``, else the checkpoint's only class, else a folder name
     in the image's path (relative to ``--input``) equal to a class of the checkpoint
     (``<input>/bottle/x.png`` -> bottle);
  3. otherwise the 'global' thresholds: F1-optimal over all classes of the evaluation pooled
     (a unified model's per-class scores differ in scale, so pass --class_name when you can).
Unreadable files get a row with ``error`` filled in; the rest are processed and the exit status
is 1 when any file failed (2 for usage errors).
"""
import argparse
import csv
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._common import add_device_args, add_trust_arg, apply_device_args  # noqa: E402
from utils.detector import (Decider, InputSpec, load_model,  # noqa: E402,F401 (API)
                            offline_net, preprocess)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
COLUMNS = ["file", "class", "score", "normalized_score", "is_anomalous", "threshold_from",
           "image_threshold", "pixel_threshold", "overlay", "mask", "error"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a DualMem checkpoint (RUN/checkpoints/last.pth); opened without "
                        "running code from it")
    p.add_argument("--input", required=True, help="an image file or a folder (recursive)")
    p.add_argument("--output", required=True, help="folder for predictions.csv, overlays, masks")
    p.add_argument("--threshold", type=float, default=None,
                   help="image-score threshold (score >= X is anomalous); overrides the stored")
    p.add_argument("--pixel_threshold", type=float, default=None,
                   help="anomaly-map threshold for the masks; overrides the stored")
    p.add_argument("--class_name", default=None, help="class whose thresholds to use")
    p.add_argument("--normalize", default=None, choices=["global", "per_image"],
                   help="heat-map colouring (default: evaluator.vis.normalize, else global)")
    add_device_args(p)
    add_trust_arg(p)
    p.add_argument("--batch_size", type=int, default=None,
                   help="default: the config's test batch size")
    p.add_argument("--no_images", action="store_true", help="write predictions.csv only")
    return p.parse_args(argv)


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
    """--class_name, the checkpoint's single class, or a path component naming a class."""
    if explicit:
        return explicit
    if len(classes) == 1:
        return classes[0]
    for part in Path(rel).parts[:-1]:
        if part in classes:
            return part
    return None


def _atomic_csv(path, rows):
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    os.replace(tmp, path)


def predict(args):
    import cv2
    import numpy as np
    import torch

    from datasets.image_io import ImageReadError, read_image
    from utils.evaluator import evaluator_settings, normalized_score
    from utils.metrics import image_score_from_map
    from utils.inference import anomaly_maps, settings_of
    from utils.visualize import annotated_overlay, vis_settings, write_png

    device = apply_device_args(args)
    model, cfg, state = load_model(args.checkpoint, device, trusted=args.trust_checkpoint)
    classes = list(state.get("classes") or [])
    thresholds = state.get("thresholds")
    if args.class_name and thresholds and args.class_name not in thresholds["per_class"]:
        raise SystemExit(f"error: --class_name '{args.class_name}' has no thresholds in "
                         f"{args.checkpoint} (classes there: "
                         f"{', '.join(thresholds['per_class'])})")
    if not thresholds and (args.threshold is None or args.pixel_threshold is None):
        raise SystemExit(f"error: {args.checkpoint} holds no thresholds (it was saved before any "
                         f"evaluation); pass --threshold and --pixel_threshold")
    if thresholds and thresholds.get("epoch") not in (None, state.get("epoch")):
        print(f"warning: the thresholds in {args.checkpoint} come from the evaluation at epoch "
              f"{thresholds['epoch']}, the weights from epoch {state.get('epoch')}",
              file=sys.stderr)
    decide = Decider(thresholds, args.threshold, args.pixel_threshold)
    _, score_cfg, _ = evaluator_settings(cfg)
    normalize = args.normalize or vis_settings(cfg)["normalize"]
    alpha = vis_settings(cfg)["alpha"]
    ds = cfg.dataset
    # size, colour order, dataset.resize (cv2_linear for a config without it) and the pixel
    # mean/std as trained; utils.detector.preprocess is the dataset's own conversion
    spec = InputSpec.from_checkpoint(cfg, state)
    color_mode = spec.color_mode
    inference = settings_of(state, cfg)
    batch_size = args.batch_size or int(ds.get("test_batch_size") or ds.get("batch_size", 8))
    if batch_size < 1:
        raise SystemExit(f"error: --batch_size must be >= 1, got {batch_size}")

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = find_images(args.input)
    rows = []

    def flush(batch):
        x = torch.stack([b["tensor"] for b in batch])
        maps = anomaly_maps(model, x, inference, device)  # as --evaluate ran it
        scores = image_score_from_map(maps, **score_cfg)
        for b, amap, score in zip(batch, maps, scores):
            row = b["row"]
            entry, source, image_t, pixel_t = decide(row["class"])
            norm = normalized_score(score, entry, image_t)
            row.update(score=repr(float(score)), threshold_from=source,
                       normalized_score=None if norm is None else f"{norm:.6f}",
                       is_anomalous=None if image_t is None else int(score >= image_t),
                       image_threshold=image_t, pixel_threshold=pixel_t)
            if args.no_images:
                continue
            try:
                h, w = b["hw"]
                full = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
                lo, hi = (entry.get("map_min"), entry.get("map_max")) \
                    if normalize == "global" else (None, None)
                stem = b["out_name"]
                picture = annotated_overlay(
                    b["display"], full, lo, hi, threshold=image_t, score=score,
                    verdict=None if image_t is None else bool(score >= image_t),
                    pixel_threshold=pixel_t, alpha=alpha, name=row["class"])
                row["overlay"] = write_png(out_dir / "overlays" / stem,
                                           picture).relative_to(out_dir).as_posix()
                if pixel_t is not None:
                    mask = (full >= pixel_t).astype(np.uint8) * 255
                    row["mask"] = write_png(out_dir / "masks" / stem,
                                            mask).relative_to(out_dir).as_posix()
            except OSError as exc:
                row["error"] = str(exc)

    batch, used = [], set()
    for path, rel in files:
        row = {"file": rel, "class": class_of(rel, args.class_name, classes)}
        rows.append(row)
        out_name = Path(rel).with_suffix(".png").as_posix()
        if out_name in used:  # x.png and x.jpg side by side: keep both
            out_name = rel + ".png"
        used.add(out_name)
        try:
            img = read_image(path, color_mode)
        except ImageReadError as exc:
            row["error"] = str(exc)
            continue
        display = img if color_mode == "RGB" else cv2.cvtColor(
            img, cv2.COLOR_BGR2RGB if color_mode == "BGR" else cv2.COLOR_GRAY2RGB)
        batch.append({"row": row, "hw": img.shape[:2], "display": display, "out_name": out_name,
                      "tensor": preprocess(img, spec)})
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)

    _atomic_csv(out_dir / "predictions.csv", rows)
    failed = [r for r in rows if r.get("error")]
    flagged = sum(1 for r in rows if r.get("is_anomalous") == 1)
    print(f"{len(rows)} images: {flagged} anomalous, {len(rows) - len(failed) - flagged} normal, "
          f"{len(failed)} failed; results in {out_dir / 'predictions.csv'}")
    for r in failed:
        print(f"  failed: {r['file']}: {r['error']}", file=sys.stderr)
    if not rows:
        print(f"error: no image files ({', '.join(EXTENSIONS)}) under {args.input}",
              file=sys.stderr)
    return 1 if failed or not rows else 0


def main(argv=None):
    """Exit status: 0 every file scored, 1 some failed (rows with an error), 2 a problem with
    the arguments or the checkpoint (one line; DUALMEM_DEBUG=1 shows the traceback)."""
    from tools._common import run_main

    return run_main(predict, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
