"""Inference over a test loader, per-class metrics, the key metric, and the result files.

Shared by training, ``--evaluate`` and ``tools/predict.py``: the thresholds and normalisation
(``utils/thresholds.py``, the rules) are stored in checkpoints and ``thresholds.json`` and read
back by prediction, so the rule that turns a score into a decision lives in one place.
"""
import csv
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dualmem.utils.metrics import (METRIC_NAMES, compute_class_metrics, mad_of, image_score_from_map,
                           summarize)
from dualmem.utils.errors import UserError
from dualmem.utils.thresholds import compute_thresholds, mask_status  # noqa: F401 (callers import it)

# UniAD key_metric names -> ours
KEY_METRIC_ALIASES = {"mean_pixel_auc": "pixel_auroc", "mean_max_auc": "image_auroc",
                      "mean_mean_auc": "image_auroc", "mean_std_auc": "image_auroc"}


def evaluator_settings(cfg):
    """(metric names, image-score kwargs, key metric) from ``evaluator:``, UniAD's form too."""
    ev = cfg.get("evaluator") or {}
    metrics = ev.get("metrics")
    score = dict(ev.get("image_score") or {})
    if isinstance(metrics, dict):  # UniAD: metrics: {auc: [{name: max, kwargs: {...}}, ...]}
        names = [m.get("name") for m in metrics.get("auc", [])]
        image_kind = next((n for n in ("max", "mean", "std") if n in names), None)
        if image_kind and "reduction" not in score:
            score["reduction"] = image_kind
            if image_kind == "max":
                entry = next(m for m in metrics["auc"] if m.get("name") == "max")
                size = (entry.get("kwargs") or {}).get("avgpool_size", [16, 16])
                score.setdefault("kernel", int(size[0]))
        metrics = (["image_auroc"] if image_kind else []) + \
                  (["pixel_auroc"] if "pixel" in names else [])
    metrics = list(metrics or METRIC_NAMES)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise UserError(f"evaluator.metrics: unknown {unknown}; choose from {METRIC_NAMES}")
    key = ev.get("key_metric") or ("pixel_auroc" if "pixel_auroc" in metrics else metrics[0])
    key = KEY_METRIC_ALIASES.get(key, key)
    if key.startswith("mean_"):
        key = key[len("mean_"):]
    if key not in metrics and key != "mad":
        raise UserError(f"evaluator.key_metric '{key}' is not among the computed metrics "
                         f"{metrics}")
    score.setdefault("reduction", "max")
    score.setdefault("kernel", 16)
    score.setdefault("topk", 0.01)
    return metrics, score, key


@torch.no_grad()
def run_inference(model, loader, device, score_cfg, amp_dtype=None, progress=True,
                  desc="evaluate"):
    """Anomaly maps, scores, labels, masks. Maps stay float32: float16 storage moved pixel AP
    (80.94 vs 80.87 on bottle) by merging close scores into ties. The model runs through
    ``utils.inference.forward_maps``, as every checkpoint consumer does."""
    from dualmem.utils.inference import forward_maps

    model.eval()
    out = {"filename": [], "clsname": [], "label": [], "score": [], "maps": [], "masks": [],
           "index": []}
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        # every tensor goes in: a feature-cached loader carries features instead of images
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()
                  if torch.is_tensor(v) and k not in ("mask", "label", "index")}
        pred = forward_maps(model, inputs, amp_dtype, device).cpu().numpy()
        out["score"].append(image_score_from_map(pred, **score_cfg))
        out["maps"].append(pred.astype(np.float32, copy=False))
        out["masks"].append((batch["mask"][:, 0].numpy() > 0.5).astype(np.uint8))
        out["label"].append(np.asarray(batch["label"]))
        out["filename"] += list(batch["filename"])
        out["clsname"] += list(batch["clsname"])
        out["index"].append(np.asarray(batch["index"]))
    for key in ("score", "maps", "masks", "label", "index"):
        out[key] = np.concatenate(out[key]) if out[key] else np.zeros(0)
    return out


def metrics_from_inference(inf, metrics, classes=None):
    """Per-class metrics (all seven names present, None = not computed or not defined, e.g. a
    class without anomalies, plus the class's ``mad``) and their unweighted mean + mAD.

    Pixel metrics count only images whose mask is a real file (``inf["has_mask"]`` when known;
    good images are all normal): a class whose anomalous images have no mask gets None, never
    figures against invented all-anomalous masks."""
    per_class = OrderedDict()
    clsnames = np.asarray(inf["clsname"])
    has_mask = inf.get("has_mask")
    need_pixels = any(m.startswith("pixel") for m in metrics)
    for cls in classes or sorted(set(inf["clsname"])):
        sel = np.flatnonzero(clsnames == cls)
        if sel.size == 0:
            continue
        pix = sel if need_pixels else None
        if need_pixels and has_mask is not None:
            real = (inf["label"][sel] <= 0.5) | np.asarray(has_mask, bool)[sel]
            pix = sel if real.all() else sel[real]
            if not np.any(inf["label"][pix] > 0.5):
                pix = None  # no anomalous image with a mask: no pixel metrics
        values = compute_class_metrics(
            inf["score"][sel], inf["label"][sel],
            None if pix is None else inf["maps"][pix],
            None if pix is None else inf["masks"][pix], metrics=metrics)
        values = {m: values.get(m) for m in METRIC_NAMES}
        values["mad"] = mad_of(values)
        per_class[cls] = values
    return per_class, summarize(per_class)


# ----------------------------------------------------------------------------- key metric
IMAGE_KEYS = tuple(m for m in METRIC_NAMES if m.startswith("image_"))  # the fallback order


def evaluation_notes(inf, mean, key, classes=None):
    """What one evaluation's figures can and cannot say, for its protocol, and the key metric
    it is ranked by: ``(notes, key metric used or None)``.

    ``no_masks``: classes whose anomalous test images have no mask file (no pixel metrics, no
    f1 pixel threshold); ``partial_masks``: classes where some have none (pixel metrics over
    the others and the good images); ``no_anomalies``: classes without anomalous test images.
    ``key_metric``: ``evaluator.key_metric`` when the evaluation has it, else the first image
    metric it has (image_auroc, image_ap, image_f1max), with the reason; "not available (no
    anomalies in the test set)" when there is none.
    """
    clsnames = np.asarray(inf["clsname"])
    has_mask = inf.get("has_mask")
    status, missing = OrderedDict(), {}
    for cls in classes or sorted(set(inf["clsname"])):
        sel = clsnames == cls
        if sel.any():
            labels = inf["label"][sel]
            masked = None if has_mask is None else np.asarray(has_mask, bool)[sel]
            status[cls] = mask_status(labels, masked)
            if status[cls] == "partial":
                missing[cls] = (int(np.sum((labels > 0.5) & ~masked)), int(np.sum(labels > 0.5)))
    notes = {}
    by = {s: [c for c, v in status.items() if v == s] for s in ("no_masks", "no_anomalies")}
    if by["no_masks"]:
        notes["no_masks"] = by["no_masks"]
    if missing:
        notes["partial_masks"] = {c: f"{k} of {n} anomalous test images have no mask: pixel "
                                     f"metrics over the other {n - k} and the good images"
                                  for c, (k, n) in missing.items()}
    if by["no_anomalies"]:
        notes["no_anomalies"] = by["no_anomalies"]
    pixel_key = key.startswith("pixel_") or key == "mad"
    no_masks = f"no masks for {', '.join(by['no_masks'])}" if by["no_masks"] else ""
    if mean.get(key) is not None:
        used, why = key, "evaluator.key_metric" + (
            f"; over the classes with masks only ({no_masks})" if pixel_key and no_masks
            else "")
        notes["key_metric"] = f"{used} ({why})"
        return notes, used
    used = next((m for m in IMAGE_KEYS if mean.get(m) is not None), None)
    if used is None:
        notes["key_metric"] = "not available (no anomalies in the test set)" if \
            len(by["no_anomalies"]) == len(status) else "not available (no image metric)"
        return notes, None
    reason = no_masks if pixel_key and no_masks and all(
        v in ("no_masks", "no_anomalies") for v in status.values()) else "it has no value"
    notes["key_metric"] = f"{used} (evaluator.key_metric {key} is not available: {reason})"
    return notes, used


def normalized_score(score, entry, threshold=None):
    """Image score -> [0, 1] with the decision threshold at exactly 0.5.

    ``(score - t) / (image_max - image_min) + 0.5``, clipped (anomalib's min-max rule), so
    ``normalized >= 0.5`` <=> ``score >= t``. None when the entry has no threshold or range.
    """
    t = entry.get("image_threshold") if threshold is None else threshold
    lo, hi = entry.get("image_min"), entry.get("image_max")
    if t is None or lo is None or hi is None:
        return None
    return float(min(1.0, max(0.0, (float(score) - t) / max(hi - lo, 1e-12) + 0.5)))


def write_thresholds(thresholds, work_dir, name="thresholds.json"):
    path = Path(work_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(thresholds, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_scores(inf, thresholds, work_dir, name="scores.csv"):
    """Per-image scores of an evaluation (what ``tools/predict.py`` reproduces without labels)."""
    path = Path(work_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    per_class = (thresholds or {}).get("per_class") or {}
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "label", "score", "normalized_score", "is_anomalous"])
        for fname, cls, label, score in zip(inf["filename"], inf["clsname"], inf["label"],
                                            inf["score"]):
            entry = per_class.get(cls) or {}
            norm = normalized_score(score, entry)
            t = entry.get("image_threshold")
            w.writerow([fname, cls, int(label), repr(float(score)),
                        "" if norm is None else f"{norm:.6f}",
                        "" if t is None else int(score >= t)])
    os.replace(tmp, path)
    return path
