"""Inference over a test loader, per-class metrics and decision thresholds.

Shared by training, ``--evaluate`` and ``tools/predict.py``: the thresholds and normalisation
computed here are stored in checkpoints and ``thresholds.json`` and read back by prediction, so
the rule that turns a score into a decision lives in one place.
"""
import csv
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.metrics import (METRIC_NAMES, compute_class_metrics, mad_of, f1_optimal_threshold,
                           image_score_from_map, summarize)
from utils.errors import UserError

THRESHOLDS_FORMAT = 1
DEFAULT_NORMAL_PERCENTILE = 99.0

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
    from utils.inference import forward_maps

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
    class without anomalies, plus the class's ``mad``) and their unweighted mean + mAD."""
    per_class = OrderedDict()
    clsnames = np.asarray(inf["clsname"])
    for cls in classes or sorted(set(inf["clsname"])):
        sel = np.flatnonzero(clsnames == cls)
        if sel.size == 0:
            continue
        need_pixels = any(m.startswith("pixel") for m in metrics)
        values = compute_class_metrics(
            inf["score"][sel], inf["label"][sel],
            inf["maps"][sel] if need_pixels else None,
            inf["masks"][sel] if need_pixels else None, metrics=metrics)
        values = {m: values.get(m) for m in METRIC_NAMES}
        values["mad"] = mad_of(values)
        per_class[cls] = values
    return per_class, summarize(per_class)


# ----------------------------------------------------------------------------- thresholds
def normal_percentile(cfg):
    """``evaluator.thresholds.normal_percentile`` (default 99): the fallback threshold rule."""
    q = ((cfg.get("evaluator") or {}).get("thresholds") or {}).get(
        "normal_percentile", DEFAULT_NORMAL_PERCENTILE)
    if not 0.0 < float(q) <= 100.0:
        raise UserError(f"evaluator.thresholds.normal_percentile must be in (0, 100], got {q}")
    return float(q)


def _threshold(values, labels, percentile):
    """F1-optimal threshold (``score >= t`` is anomalous) when both kinds are present, else the
    ``percentile`` of the normal values; (threshold or None, how it was chosen)."""
    t = f1_optimal_threshold(values, labels)
    if t is not None:
        return t, "f1"
    normal = np.asarray(values)[np.asarray(labels) <= 0.5]
    if normal.size == 0:
        return None, "unavailable"
    return float(np.percentile(normal.astype(np.float32), percentile)), f"normal_p{percentile:g}"


def _min_max(x, chunk=1 << 22):
    """(min, max) in float32 chunks: numpy reduces float16 ~3x slower than float32."""
    flat = np.asarray(x).reshape(-1)
    lo, hi = np.inf, -np.inf
    for a in range(0, flat.size, chunk):
        c = flat[a:a + chunk].astype(np.float32, copy=False)
        lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    return lo, hi


def _threshold_entry(scores, labels, maps, masks, percentile, map_range=None):
    image_t, image_src = _threshold(scores, labels, percentile)
    pixel_t, pixel_src = _threshold(maps, masks, percentile)
    map_min, map_max = map_range or _min_max(maps)
    return {
        "n_images": int(len(scores)), "n_anomalous": int(np.sum(labels > 0)),
        "image_threshold": image_t, "image_threshold_source": image_src,
        "pixel_threshold": pixel_t, "pixel_threshold_source": pixel_src,
        "image_min": float(np.min(scores)), "image_max": float(np.max(scores)),
        "map_min": map_min, "map_max": map_max,
    }


def compute_thresholds(inf, score_cfg, classes=None, percentile=DEFAULT_NORMAL_PERCENTILE,
                       epoch=None):
    """Per-class decision thresholds and normalisation ranges from one evaluation.

    Image threshold: F1-optimal on the class's image scores; pixel threshold: F1-optimal over
    all its pixels (both via ``metrics.f1_optimal_threshold``, so tied F1 picks the higher
    threshold). A class without anomalies (or without normal images) falls back to the
    ``percentile`` of its normal scores / pixels. ``image_min/max`` (image scores) and
    ``map_min/max`` (anomaly maps) are the ranges of normalised scores and of the 'global'
    heat-map colouring. ``global`` holds the same computed over all classes pooled: what
    prediction uses when an image's class is unknown.
    """
    clsnames = np.asarray(inf["clsname"])
    per_class = OrderedDict()
    for cls in classes or sorted(set(inf["clsname"])):
        sel = np.flatnonzero(clsnames == cls)
        if sel.size:
            per_class[cls] = _threshold_entry(inf["score"][sel], inf["label"][sel],
                                              inf["maps"][sel], inf["masks"][sel], percentile)
    if len(per_class) <= 1:
        pooled = dict(next(iter(per_class.values()), {}))
    else:
        pooled = _threshold_entry(inf["score"], inf["label"], inf["maps"], inf["masks"],
                                  percentile, (min(e["map_min"] for e in per_class.values()),
                                               max(e["map_max"] for e in per_class.values())))
    return {"format": THRESHOLDS_FORMAT, "epoch": epoch, "image_score": dict(score_cfg),
            "normal_percentile": percentile, "per_class": per_class, "global": pooled}


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
