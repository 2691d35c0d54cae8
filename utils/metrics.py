"""Anomaly-detection metrics (image and pixel level), exact and fast, numpy only.

Every ranking metric here is derived from one *curve*: for each distinct score value ``t``
(descending) the number of positives / negatives scored ``>= t`` and ``> t``. Ties therefore
behave exactly as in scikit-learn (a tie group is one operating point), and AUROC / AP / F1-max /
AUPRO all reuse the same curve, so the expensive part (ordering ~10^8 pixel scores) is done once:

* float16 maps: a 65,536-bin histogram over the float16 bit patterns gives the exact tie groups
  of all pixels in O(N) without any sort (bins are ordered by value afterwards; -0 and +0 merged).
* other dtypes: one ``np.sort`` of all scores (no argsort of the big array) plus an argsort of the
  positive pixels only; counts at each positive value come from ``searchsorted``.

Only score values that contain positives are needed as curve points: between two of them the
curve is a horizontal segment (only negatives are added), so AUROC, AP, F1-max and AUPRO are exact
with that reduced point set.

Policy: a metric is ``None`` when the class has no positives or no negatives (a one-class
ranking metric is meaningless, and AP / F1 would be trivially 1). AUROC < 0.5 is never flipped.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional

import numpy as np

METRIC_NAMES = [
    "image_auroc", "image_ap", "image_f1max",
    "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
]  # the one list: evaluation, tables and collect_results all read it
IMAGE_METRICS = [m for m in METRIC_NAMES if m.startswith("image_")]
PIXEL_METRICS = [m for m in METRIC_NAMES if m.startswith("pixel_")]
# mAD is ADer's mean of these seven published metrics: pinned, so a metric added above never
# changes what an existing mAD figure means
MAD_METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
               "pixel_f1max", "pixel_aupro")
TABLE_METRICS = METRIC_NAMES + ["mad"]  # column order of every results table

from dualmem.utils.ranking_curve import _CHUNK, _build_curve, _cv2, _to_numpy  # noqa: E402


# ----------------------------------------------------------------------------- public API

def image_auroc(scores, labels) -> Optional[float]:
    """ROC AUC of image scores vs labels (identical to sklearn.roc_auc_score); None if one class."""
    return _build_curve(np.ravel(_to_numpy(scores)), np.ravel(_to_numpy(labels))).auroc()


def image_ap(scores, labels) -> Optional[float]:
    """Average precision (identical to sklearn.average_precision_score); None if one class."""
    return _build_curve(np.ravel(_to_numpy(scores)), np.ravel(_to_numpy(labels))).ap()


def image_f1max(scores, labels) -> Optional[float]:
    """Max over thresholds (score >= t is anomalous) of F1; None if one class."""
    return _build_curve(np.ravel(_to_numpy(scores)), np.ravel(_to_numpy(labels))).f1max()


def f1_optimal_threshold(scores, labels) -> Optional[float]:
    """Score threshold maximising F1 when predicting ``score >= threshold`` as anomalous.

    Any shape (image scores or pixel maps). Ties in F1 pick the highest threshold. None if the
    inputs hold a single class, as for the metrics.
    """
    return _build_curve(scores, labels).f1_threshold()


def pixel_auroc(maps, masks) -> Optional[float]:
    """Pixel ROC AUC over all pixels of the class (masks binarised as mask > 0.5)."""
    return _build_curve(maps, masks).auroc()


def pixel_ap(maps, masks) -> Optional[float]:
    """Pixel average precision over all pixels of the class."""
    return _build_curve(maps, masks).ap()


def pixel_f1max(maps, masks) -> Optional[float]:
    """Pixel F1-max over all pixels of the class."""
    return _build_curve(maps, masks).f1max()


def pixel_aupro(maps, masks, fpr_limit: float = 0.3) -> Optional[float]:
    """MVTec AUPRO: area under PRO(FPR) for FPR in [0, fpr_limit], divided by fpr_limit.

    PRO = mean over 8-connected GT regions (per image) of the fraction predicted positive; FPR over
    all normal pixels of the class. The curve is interpolated at exactly ``fpr_limit``; result <= 1.
    """
    return _build_curve(maps, masks, regions=True).aupro(fpr_limit)


def ranking_curves(scores, labels, regions: bool = False,
                   fpr_limit: float = 0.3) -> Optional[Dict[str, object]]:
    """Plot-ready curves from the very curve the metrics above are computed on (one pass).

    Returns None when the inputs hold one class only; else a dict with ``roc`` (fpr, tpr),
    ``pr`` (recall, precision; step function, precision of each step's right end), ``auroc``,
    ``ap``, ``f1max``, ``f1_threshold``, ``n_pos``, ``n_neg`` and, with ``regions=True`` (maps
    N x H x W), ``pro`` (fpr, pro) cut at ``fpr_limit`` and ``aupro``: the trapezoid area of
    ``roc`` is ``auroc``, that of ``pro`` divided by ``fpr_limit`` is ``pixel_aupro``.
    """
    if regions:
        c = _build_curve(scores, labels, regions=True)
    else:
        c = _build_curve(np.ravel(_to_numpy(scores)), np.ravel(_to_numpy(labels)))
    if not c.valid:
        return None
    out = {"roc": c.roc_xy(), "pr": c.pr_xy(), "auroc": c.auroc(), "ap": c.ap(),
           "f1max": c.f1max(), "f1_threshold": c.f1_threshold(), "n_pos": c.n_pos,
           "n_neg": c.n_neg}
    if regions:
        out["pro"] = c.pro_xy(fpr_limit)
        out["aupro"] = c.aupro(fpr_limit)
        out["fpr_limit"] = float(fpr_limit)
    return out


def mad_of(values):
    """ADer's mAD: the mean of the seven published metrics, None when any is missing."""
    seven = [values.get(m) for m in MAD_METRICS]
    return None if any(v is None for v in seven) else float(np.mean(seven))


def compute_class_metrics(image_scores, image_labels, maps=None, masks=None,
                          metrics: Iterable[str] = METRIC_NAMES) -> Dict[str, Optional[float]]:
    """All requested metrics for one class, sharing one curve per level.

    ``maps``: N x H x W (or N x 1 x H x W) anomaly maps, numpy or torch (float16 is fastest: exact
    O(N) histogram path); ``masks``: same shape GT (bool/uint8/float, binarised > 0.5). Pixel
    metrics are None when maps or masks is None; every metric is None when its level has a
    single class.
    """
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; valid: {METRIC_NAMES}")
    out: Dict[str, Optional[float]] = {m: None for m in metrics}
    if any(m in IMAGE_METRICS for m in metrics) and image_scores is not None:
        c = _build_curve(np.ravel(_to_numpy(image_scores)), np.ravel(_to_numpy(image_labels)))
        for m, fn in (("image_auroc", c.auroc), ("image_ap", c.ap), ("image_f1max", c.f1max)):
            if m in out:
                out[m] = fn()
    if any(m in PIXEL_METRICS for m in metrics) and maps is not None and masks is not None:
        c = _build_curve(maps, masks, regions="pixel_aupro" in out)
        for m, fn in (("pixel_auroc", c.auroc), ("pixel_ap", c.ap), ("pixel_f1max", c.f1max),
                      ("pixel_aupro", c.aupro)):
            if m in out:
                out[m] = fn()
    return out


def summarize(per_class: Mapping[str, Mapping[str, Optional[float]]]
              ) -> Dict[str, Optional[float]]:
    """Unweighted mean over classes of each metric (None values ignored; None if all None).

    ``mad`` = mean of the seven metric means, and None if any of them is None: a mean over a
    subset would not be comparable with published mAD numbers.
    """
    def is_num(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    names = list(METRIC_NAMES)  # then any extra numeric keys (e.g. per-class thresholds)
    for d in per_class.values():
        names += [k for k, v in d.items() if k not in names and k != "mad" and is_num(v)]
    out: Dict[str, Optional[float]] = {}
    for name in names:
        vals = [float(d[name]) for d in per_class.values() if is_num(d.get(name))]
        out[name] = float(np.mean(vals)) if vals else None
    out["mad"] = mad_of(out)
    return out


def image_score_from_map(maps, reduction: str = "max", kernel: int = 16,
                         topk: float = 0.01) -> np.ndarray:
    """Reduce anomaly maps (..., H, W) to image scores (...) as float64.

    * ``max``: max of the kernel x kernel, stride-1, unpadded mean filter (== torch
      ``avg_pool2d(x, kernel, stride=1).amax()``); smoothing makes it robust to single-pixel
      spikes. ``kernel`` is clamped to min(H, W); kernel 1 is the plain max.
    * ``mean``: mean of the map. ``std``: population std (ddof=0).
    * ``topk``: mean of the top ``ceil(topk * H * W)`` pixels (at least one), ``topk`` in (0, 1].
    """
    x = _to_numpy(maps)
    if x.ndim < 2:
        raise ValueError(f"maps must be (..., H, W), got shape {x.shape}")
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    x = x.reshape(-1, h, w)
    out = np.empty(x.shape[0], dtype=np.float64)
    step = max(1, _CHUNK // max(1, h * w))
    if reduction == "max":
        if kernel < 1:
            raise ValueError(f"kernel must be >= 1, got {kernel}")
        k = int(min(kernel, h, w))
        if _cv2 is not None and k > 1:  # cv2 box filter: ~5x faster; crop = valid windows
            lo = k // 2  # cv2's default anchor for an even or odd kernel
            for i in range(x.shape[0]):
                b = _cv2.blur(x[i].astype(np.float32), (k, k), borderType=_cv2.BORDER_CONSTANT)
                out[i] = b[lo:h - k + lo + 1, lo:w - k + lo + 1].max()
            return out.reshape(lead)
        for a in range(0, x.shape[0], step):
            c = x[a:a + step].astype(np.float64)
            if k == 1:
                out[a:a + step] = c.reshape(len(c), -1).max(axis=1)
                continue
            s = np.zeros((len(c), h + 1, w + 1))  # integral image: exact box sums in float64
            np.cumsum(c, axis=1, out=s[:, 1:, 1:])
            np.cumsum(s[:, 1:, 1:], axis=2, out=s[:, 1:, 1:])
            box = s[:, k:, k:] - s[:, :-k, k:] - s[:, k:, :-k] + s[:, :-k, :-k]
            out[a:a + step] = box.reshape(len(c), -1).max(axis=1) / (k * k)
    elif reduction == "mean":
        for a in range(0, x.shape[0], step):
            out[a:a + step] = x[a:a + step].reshape(-1, h * w).mean(axis=1, dtype=np.float64)
    elif reduction == "std":
        for a in range(0, x.shape[0], step):
            out[a:a + step] = x[a:a + step].reshape(-1, h * w).astype(np.float64).std(axis=1)
    elif reduction == "topk":
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"topk must be a fraction in (0, 1], got {topk}")
        n = max(1, int(math.ceil(topk * h * w - 1e-9)))
        for a in range(0, x.shape[0], step):
            c = x[a:a + step].reshape(-1, h * w)
            top = np.partition(c, h * w - n, axis=1)[:, h * w - n:]
            out[a:a + step] = top.mean(axis=1, dtype=np.float64)
    else:
        raise ValueError(f"unknown reduction {reduction!r}; use max, mean, std or topk")
    return out.reshape(lead)
