"""Inference over a test loader and per-class metrics; shared by training and ``--evaluate``."""
from collections import OrderedDict

import numpy as np
import torch
from tqdm import tqdm

from utils.metrics import METRIC_NAMES, compute_class_metrics, image_score_from_map, summarize

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
        raise ValueError(f"evaluator.metrics: unknown {unknown}; choose from {METRIC_NAMES}")
    key = ev.get("key_metric") or ("pixel_auroc" if "pixel_auroc" in metrics else metrics[0])
    key = KEY_METRIC_ALIASES.get(key, key)
    if key.startswith("mean_"):
        key = key[len("mean_"):]
    if key not in metrics and key != "mad":
        raise ValueError(f"evaluator.key_metric '{key}' is not among the computed metrics "
                         f"{metrics}")
    score.setdefault("reduction", "max")
    score.setdefault("kernel", 16)
    score.setdefault("topk", 0.01)
    return metrics, score, key


@torch.no_grad()
def run_inference(model, loader, device, score_cfg, amp_dtype=None, progress=True,
                  desc="evaluate"):
    """Anomaly maps (float16, to keep a VisA-size test set small), scores, labels, masks."""
    model.eval()
    out = {"filename": [], "clsname": [], "label": [], "score": [], "maps": [], "masks": [],
           "index": []}
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        image = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            pred = model({"image": image})["pred"]
        pred = pred[:, 0].float().cpu().numpy()
        out["score"].append(image_score_from_map(pred, **score_cfg))
        out["maps"].append(pred.astype(np.float16))
        out["masks"].append((batch["mask"][:, 0].numpy() > 0.5).astype(np.uint8))
        out["label"].append(np.asarray(batch["label"]))
        out["filename"] += list(batch["filename"])
        out["clsname"] += list(batch["clsname"])
        out["index"].append(np.asarray(batch["index"]))
    for key in ("score", "maps", "masks", "label", "index"):
        out[key] = np.concatenate(out[key]) if out[key] else np.zeros(0)
    return out


def metrics_from_inference(inf, metrics, classes=None):
    per_class = OrderedDict()
    clsnames = np.asarray(inf["clsname"])
    for cls in classes or sorted(set(inf["clsname"])):
        sel = np.flatnonzero(clsnames == cls)
        if sel.size == 0:
            continue
        need_pixels = any(m.startswith("pixel") for m in metrics)
        per_class[cls] = compute_class_metrics(
            inf["score"][sel], inf["label"][sel],
            inf["maps"][sel] if need_pixels else None,
            inf["masks"][sel] if need_pixels else None, metrics=metrics)
    return per_class, summarize(per_class)
