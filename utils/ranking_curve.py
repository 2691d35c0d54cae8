"""The ranking curve every metric in utils/metrics.py is read from: for each distinct score
(or a float16 histogram bin), true positives, false positives and, for pixels, the per-region
overlap (PRO), built once per class by sorting or by histogram. See utils/metrics.py."""
from __future__ import annotations

from typing import Optional

import numpy as np

try:  # cv2 labelling is ~5x faster than scipy; both are exact 8-connectivity labellings
    import cv2 as _cv2
except Exception:  # pragma: no cover - cv2 is a project dependency, scipy is the fallback
    _cv2 = None

_CHUNK = 1 << 22          # elements per streamed chunk: keeps temporaries at tens of MB
_HIST_MIN_SIZE = 1 << 16  # below this a float16 input is simply sorted


# ----------------------------------------------------------------------------- helpers

def _to_numpy(x) -> np.ndarray:
    """Accept numpy arrays, lists and (CPU or CUDA) torch tensors without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    if x.dtype == np.bool_:
        x = x.view(np.uint8)
    return x


def _rows(x: np.ndarray) -> np.ndarray:
    """View as (rows, cols) so inputs can be streamed in chunks of whole rows (images)."""
    if x.ndim == 0:
        return x.reshape(1, 1)
    return x.reshape(x.shape[0], -1)


class _Curve:
    """Cumulative counts at each distinct score value that holds positives (descending).

    ``tp[k]``/``fp_ge[k]``: positives/negatives scored >= thr[k]; ``fp_gt[k]``: negatives > thr[k];
    ``pro[k]``: mean over GT regions of the covered fraction at thr[k] (None if not requested).
    """

    def __init__(self, thr, tp, fp_ge, fp_gt, n_pos, n_neg, pro=None):
        self.thr = np.asarray(thr, dtype=np.float64)
        self.tp = np.asarray(tp, dtype=np.float64)
        self.fp_ge = np.asarray(fp_ge, dtype=np.float64)
        self.fp_gt = np.asarray(fp_gt, dtype=np.float64)
        self.n_pos = int(n_pos)
        self.n_neg = int(n_neg)
        self.pro = None if pro is None else np.minimum(np.asarray(pro, dtype=np.float64), 1.0)

    @property
    def valid(self) -> bool:
        return self.n_pos > 0 and self.n_neg > 0

    def auroc(self) -> Optional[float]:
        if not self.valid:
            return None
        tp, ge, gt = self.tp, self.fp_ge, self.fp_gt
        tp_prev = np.concatenate(([0.0], tp[:-1]))
        ge_prev = np.concatenate(([0.0], ge[:-1]))
        # horizontal run (negatives only) + the tie group's diagonal + the tail after the last positive
        area = (np.dot(tp_prev, gt - ge_prev) + 0.5 * np.dot(tp_prev + tp, ge - gt)
                + tp[-1] * (self.n_neg - ge[-1]))
        return float(area / (float(self.n_pos) * float(self.n_neg)))

    def ap(self) -> Optional[float]:
        if not self.valid:
            return None
        tp = self.tp
        d_tp = np.diff(tp, prepend=0.0)
        return float(max(0.0, np.sum(d_tp * (tp / (tp + self.fp_ge))) / self.n_pos))

    def _f1(self) -> np.ndarray:
        # 2PR/(P+R) == 2 TP / (TP + FP + n_pos); P+R > 0 at every point since tp > 0 there
        return 2.0 * self.tp / (self.tp + self.fp_ge + self.n_pos)

    def f1max(self) -> Optional[float]:
        if not self.valid:
            return None
        return float(np.max(self._f1()))

    def f1_threshold(self) -> Optional[float]:
        if not self.valid:
            return None
        return float(self.thr[int(np.argmax(self._f1()))])

    def _polyline(self, y_at):
        """(x, y): (0, 0), then per group (fp_gt, y_prev) -> (fp_ge, y), finally (1, y_last);
        x = FPR. A tie group is one straight segment (scikit-learn's convention)."""
        n = float(self.n_neg)
        y_prev = np.concatenate(([0.0], y_at[:-1]))
        x = np.empty(2 * len(y_at) + 2)
        y = np.empty_like(x)
        x[0] = y[0] = 0.0
        x[1:-1:2], y[1:-1:2] = self.fp_gt / n, y_prev
        x[2:-1:2], y[2:-1:2] = self.fp_ge / n, y_at
        x[-1], y[-1] = 1.0, y_at[-1]
        return x, y

    def roc_xy(self):
        """ROC polyline (fpr, tpr); its trapezoid area is ``auroc()``."""
        return self._polyline(self.tp / self.n_pos)

    def pr_xy(self):
        """PR points (recall, precision) by increasing recall, one per group, after (0, 1);
        ``ap()`` is the area of its step function (precision of the right end)."""
        recall = np.concatenate(([0.0], self.tp / self.n_pos))
        precision = np.concatenate(([1.0], self.tp / (self.tp + self.fp_ge)))
        return recall, precision

    def pro_xy(self, fpr_limit: Optional[float] = None):
        """PRO polyline (fpr, pro); with ``fpr_limit`` cut at that FPR (interpolated there),
        so its trapezoid area / fpr_limit is ``aupro(fpr_limit)``."""
        x, y = self._polyline(self.pro)
        return (x, y) if fpr_limit is None else _cut(x, y, fpr_limit)

    def aupro(self, fpr_limit: float = 0.3) -> Optional[float]:
        if not self.valid or self.pro is None:
            return None
        return _partial_area(*self.pro_xy(), fpr_limit)


def _cut(x: np.ndarray, y: np.ndarray, limit: float):
    """The polyline (x ascending) for x in [0, limit], interpolated at exactly ``limit``."""
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {limit}")
    i = int(np.searchsorted(x, limit, side="right"))  # x[:i] <= limit < x[i]
    if i < len(x):
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        x = np.append(x[:i], limit)
        y = np.append(y[:i], y_lim)
    return x, y


def _partial_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y) for x in [0, limit] (curve interpolated at ``limit``) / limit."""
    x, y = _cut(x, y, limit)
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1])) * 0.5)
    return float(min(1.0, max(0.0, area / limit)))


# ----------------------------------------------------------------------------- float16 histogram

_F16 = None


def _f16_tables():
    """Bin order for the int16-view histogram: bins sorted by float16 value, NaN bins, group ids."""
    global _F16
    if _F16 is None:
        bins = np.arange(65536, dtype=np.int64)
        # histogram bin b holds int16 bit pattern (b - 32768), i.e. uint16 pattern b ^ 0x8000
        vals = (bins ^ 0x8000).astype(np.uint16).view(np.float16).astype(np.float64)
        nan_bins = np.flatnonzero(np.isnan(vals))
        ok = np.flatnonzero(~np.isnan(vals))
        order = ok[np.argsort(-vals[ok], kind="stable")]  # descending value
        sv = vals[order]
        starts = np.flatnonzero(np.concatenate(([True], sv[1:] != sv[:-1])))  # merges -0 / +0
        _F16 = (order, starts, sv[starts], nan_bins)
    return _F16


def _f16_bins(x: np.ndarray) -> np.ndarray:
    # int16 -> intp is a fast cast (uint16 -> intp is ~10x slower in numpy)
    b = np.ascontiguousarray(x).view(np.int16).ravel().astype(np.intp)
    b += 32768
    return b


def _curve_from_hist(hist, pos_bins, pos_w, n_regions) -> _Curve:
    order, starts, gvals, nan_bins = _f16_tables()
    if hist[nan_bins].any():
        raise ValueError("scores contain NaN")
    all_g = np.add.reduceat(hist[order], starts)
    pos_g = np.add.reduceat(np.bincount(pos_bins, minlength=65536)[order], starts)
    keep = pos_g > 0  # reduce to values holding positives (see module docstring)
    n_all = int(all_g.sum())
    n_pos = int(pos_g.sum())
    tp = np.cumsum(pos_g)
    all_ge = np.cumsum(all_g)
    fp_ge = all_ge - tp
    fp_gt = (all_ge - all_g) - (tp - pos_g)
    pro = None
    if pos_w is not None:
        w_g = np.add.reduceat(np.bincount(pos_bins, weights=pos_w, minlength=65536)[order], starts)
        pro = np.cumsum(w_g)[keep] / max(n_regions, 1)
    return _Curve(gvals[keep], tp[keep], fp_ge[keep], fp_gt[keep], n_pos, n_all - n_pos, pro)


# ----------------------------------------------------------------------------- sort path

def _curve_from_sorted(sorted_all, pos_scores, pos_w, n_regions) -> _Curve:
    n_all = sorted_all.size
    if sorted_all.dtype.kind == "f" and n_all and np.isnan(sorted_all[-1]):
        raise ValueError("scores contain NaN")
    n_pos = pos_scores.size
    if n_pos == 0:
        return _Curve([], [], [], [], 0, n_all)
    o = np.argsort(pos_scores)[::-1]
    s = pos_scores[o]
    ends = np.flatnonzero(s[1:] != s[:-1])
    ends = np.append(ends, n_pos - 1)
    pv = s[ends]
    tp = ends + 1
    tp_prev = np.concatenate(([0], tp[:-1]))
    all_ge = n_all - np.searchsorted(sorted_all, pv, side="left")
    all_gt = n_all - np.searchsorted(sorted_all, pv, side="right")
    pro = None
    if pos_w is not None:
        pro = np.cumsum(pos_w[o])[ends] / max(n_regions, 1)
    return _Curve(pv, tp, all_ge - tp, all_gt - tp_prev, n_pos, n_all - n_pos, pro)


# ----------------------------------------------------------------------------- curve builder

def _label_regions(mask2d: np.ndarray):
    """8-connected components of one binary mask -> (label image, number of regions)."""
    m = np.ascontiguousarray(mask2d, dtype=np.uint8)
    if _cv2 is not None:
        n, lab = _cv2.connectedComponents(m, connectivity=8, ltype=_cv2.CV_32S)
        return lab, n - 1
    from scipy import ndimage
    lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
    return lab, n


def _squeeze_channel(x: np.ndarray) -> np.ndarray:
    """N x 1 x H x W -> N x H x W (network outputs usually keep the channel axis)."""
    return x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x


def _build_curve(scores, labels, regions: bool = False, method: str = "auto") -> _Curve:
    """Curve of ``scores`` vs ``labels > 0.5`` over all elements.

    ``regions=True`` (inputs N x H x W) also computes PRO: each 8-connected GT region of each
    image gets total weight 1/num_regions spread over its pixels, so the cumulative weight above
    a threshold is the mean per-region overlap. ``method``: 'auto' | 'hist' | 'sort' (tests).
    """
    scores = _squeeze_channel(_to_numpy(scores))
    labels = _squeeze_channel(_to_numpy(labels))
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    if scores.dtype.kind not in "fiu":
        raise TypeError(f"scores must be numeric, got {scores.dtype}")
    if regions:
        if scores.ndim == 2:
            scores, labels = scores[None], labels[None]
        if scores.ndim != 3:
            raise ValueError(f"maps/masks must be N x H x W, got {scores.shape}")
    if scores.size == 0:
        return _Curve([], [], [], [], 0, 0)
    if method == "auto":
        method = "hist" if scores.dtype == np.float16 and scores.size >= _HIST_MIN_SIZE else "sort"
    if method == "hist" and scores.dtype != np.float16:
        raise ValueError("histogram path is exact only for float16 scores")

    s2, l2 = _rows(scores), _rows(labels)
    step = max(1, _CHUNK // max(1, s2.shape[1]))
    hist = np.zeros(65536, dtype=np.int64) if method == "hist" else None
    pos_s, pos_r = [], []
    n_regions = 0
    for a in range(0, s2.shape[0], step):
        sc = s2[a:a + step]
        lb = l2[a:a + step] > 0.5
        if hist is not None:
            hist += np.bincount(_f16_bins(sc), minlength=65536)
        if not regions:
            idx = np.flatnonzero(lb)
            if idx.size:
                pos_s.append(np.ascontiguousarray(sc).ravel()[idx])
            continue
        for j in np.flatnonzero(lb.any(axis=1)):
            lab, n = _label_regions(lb[j].reshape(scores.shape[1:]))
            flat = lab.ravel()
            idx = np.flatnonzero(flat)
            pos_s.append(sc[j][idx])
            pos_r.append(flat[idx] + (n_regions - 1))  # global 0-based region id
            n_regions += n

    pos_scores = np.concatenate(pos_s) if pos_s else np.zeros(0, dtype=scores.dtype)
    pos_w = None
    if regions:
        rid = np.concatenate(pos_r) if pos_r else np.zeros(0, dtype=np.int64)
        sizes = np.bincount(rid, minlength=n_regions).astype(np.float64)
        pos_w = (1.0 / sizes)[rid] if rid.size else np.zeros(0)
        del rid
    if method == "hist":
        return _curve_from_hist(hist, _f16_bins(pos_scores), pos_w, n_regions)
    sorted_all = np.sort(scores, axis=None)
    return _curve_from_sorted(sorted_all, pos_scores, pos_w, n_regions)
