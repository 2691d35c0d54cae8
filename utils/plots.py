"""Curves and score histograms of an evaluation, per class, drawn with matplotlib (Agg, headless).

Every curve comes from ``utils.metrics.ranking_curves``, the very curve the reported metrics are
computed on, so a legend's area is the table's figure: image and pixel ROC (area = AUROC), image
and pixel precision-recall (step function, area = AP), the pixel PRO curve up to FPR
``fpr_limit`` (MVTec definition; area / fpr_limit = AUPRO) and a histogram of the image scores of
normal and anomalous test images with the class's image threshold drawn.

The figures are built with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``): no pyplot,
no global backend switch, nothing kept open. ``class_figures`` returns the ``Figure`` objects
(tests read the plotted data back from them); ``figure_to_rgb`` renders one to RGB uint8.
"""
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dualmem.utils.metrics import ranking_curves

FIGSIZE = (4.0, 3.3)   # inches; at DPI 100 -> 400 x 330 pixels
DPI = 100
FPR_LIMIT = 0.3
COLORS = {"image": "#1f77b4", "pixel": "#d62728", "normal": "#2ca02c", "anomalous": "#d62728"}
KINDS = ("roc", "pr", "pro", "hist")   # the order of the pictures of a class


def _pct(v):
    return "n/a" if v is None else f"{100.0 * v:.2f}"


def _figure(title, figsize=FIGSIZE):
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e0e0e0", linewidth=0.6)
    return fig, ax


def _undefined(ax, what, why="a single kind of label"):
    ax.text(0.5, 0.5, f"{what}: undefined\n({why})", ha="center", va="center",
            fontsize=8, color="#666666", transform=ax.transAxes)


def figure_to_rgb(fig):
    """Render a Figure to an H x W x 3 uint8 RGB array (and release its memory)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return rgb


def class_curves(inf, cls, fpr_limit=FPR_LIMIT):
    """``{"image": ranking_curves of the image scores, "pixel": of the maps with PRO}`` of the
    class ``cls`` in an inference dict (None for a level with one kind of label), plus the
    class's ``scores`` and ``labels``."""
    sel = np.flatnonzero(np.asarray(inf["clsname"]) == cls)
    scores = np.asarray(inf["score"])[sel].astype(np.float64)
    labels = np.asarray(inf["label"])[sel]
    pixel = None
    if inf.get("has_mask") is not None:  # as the metrics: only images whose mask is a file
        sel_px = sel[(labels <= 0.5) | np.asarray(inf["has_mask"], bool)[sel]]
    else:
        sel_px = sel
    has_anomalous_mask = bool(np.any(np.asarray(inf["label"])[sel_px] > 0.5))
    if inf.get("maps") is not None and inf.get("masks") is not None and len(inf["maps"]) \
            and has_anomalous_mask:  # no masks: no pixel curve against invented ones
        pixel = ranking_curves(inf["maps"][sel_px], inf["masks"][sel_px], regions=True,
                               fpr_limit=fpr_limit)
    return {"image": ranking_curves(scores, labels), "pixel": pixel, "scores": scores,
            "labels": labels, "fpr_limit": fpr_limit,
            "no_masks": bool(np.any(labels > 0.5)) and not has_anomalous_mask}


def draw_roc(lines, title, figsize=FIGSIZE):
    """The one ROC drawer (this report's per-class plot, TensorBoard's per-level plot):
    ``lines`` = [(name, ranking_curves result or None, colour, gid), ...]; the legend gives each
    area (= AUROC) in %, and a line of one kind of label is listed as 'n/a' without a curve."""
    fig, ax = _figure(title, figsize)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="#999999", label="chance")
    drawn = 0
    for name, c, color, gid in lines:
        if c is None:
            ax.plot([], [], lw=1.5, color=color, label=f"{name} AUROC n/a")
            continue
        x, y = c["roc"]
        ax.plot(x, y, lw=1.5, color=color, gid=gid, label=f"{name} AUROC {_pct(c['auroc'])}")
        drawn += 1
    if not drawn:
        _undefined(ax, "ROC")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate", fontsize=9)
    ax.set_ylabel("true positive rate", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_roc(curves, cls):
    """Image and pixel ROC of one class (a level with one kind of label is left out)."""
    return draw_roc([(level, curves[level], COLORS[level], f"{level}_roc")
                     for level in ("image", "pixel") if curves.get(level) is not None],
                    f"{cls}: ROC")


def plot_pr(curves, cls):
    """Image and pixel precision-recall of one class as the step functions AP integrates
    (precision of each step's right end); dotted: the positive rate (a random ranking)."""
    fig, ax = _figure(f"{cls}: precision-recall")
    drawn = 0
    for level in ("image", "pixel"):
        c = curves.get(level)
        if c is None:
            continue
        r, p = c["pr"]
        ax.step(r, p, where="pre", lw=1.5, color=COLORS[level], gid=f"{level}_pr",
                label=f"{level} AP {_pct(c['ap'])}")
        rate = c["n_pos"] / float(c["n_pos"] + c["n_neg"])
        ax.axhline(rate, ls=":", lw=0.8, color=COLORS[level])
        drawn += 1
    if drawn:
        ax.legend(loc="lower left", fontsize=8)
    else:
        _undefined(ax, "precision-recall")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall", fontsize=9)
    ax.set_ylabel("precision", fontsize=9)
    fig.tight_layout()
    return fig


def plot_pro(curves, cls):
    """Pixel PRO (mean per-region overlap) against pixel FPR up to the FPR limit; the legend
    gives AUPRO (area / limit) in %."""
    limit = curves.get("fpr_limit", FPR_LIMIT)
    fig, ax = _figure(f"{cls}: PRO up to FPR {limit:g}")
    c = curves.get("pixel")
    if c is None or "pro" not in c:
        _undefined(ax, "PRO", "no masks" if curves.get("no_masks") else
                   "a single kind of label")
    else:
        x, y = c["pro"]
        ax.plot(x, y, lw=1.5, color=COLORS["pixel"], gid="pixel_pro",
                label=f"AUPRO@{limit:g} {_pct(c['aupro'])}")
        ax.fill_between(x, y, color=COLORS["pixel"], alpha=0.12, lw=0)
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, limit)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("pixel false positive rate", fontsize=9)
    ax.set_ylabel("per-region overlap", fontsize=9)
    fig.tight_layout()
    return fig


def plot_histogram(scores, labels, cls, threshold=None, source=None, bins=30):
    """Image scores of the normal and the anomalous test images (shared bins) and the image
    threshold (``score >= threshold`` is anomalous) as a vertical line."""
    fig, ax = _figure(f"{cls}: image scores")
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels) > 0
    values = scores if threshold is None else np.append(scores, float(threshold))
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi - lo <= 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, int(min(bins, max(5, 2 * np.sqrt(max(scores.size, 1))))) + 1)
    for name, sel in (("normal", ~labels), ("anomalous", labels)):
        ax.hist(scores[sel], bins=edges, alpha=0.55, color=COLORS[name], gid=f"hist_{name}",
                label=f"{name} (n={int(sel.sum())})")
    if threshold is not None:
        how = f" ({source})" if source else ""
        ax.axvline(float(threshold), color="black", ls="--", lw=1.2, gid="threshold",
                   label=f"threshold {float(threshold):.4g}{how}")
    ax.set_xlabel("image score", fontsize=9)
    ax.set_ylabel("test images", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def class_figures(inf, cls, entry=None, fpr_limit=FPR_LIMIT):
    """The four figures of one class, ``{kind: Figure}`` in ``KINDS`` order; ``entry`` is the
    class's ``compute_thresholds`` entry (for the histogram's threshold line)."""
    entry = entry or {}
    curves = class_curves(inf, cls, fpr_limit)
    return {"roc": plot_roc(curves, cls), "pr": plot_pr(curves, cls),
            "pro": plot_pro(curves, cls),
            "hist": plot_histogram(curves["scores"], curves["labels"], cls,
                                   entry.get("image_threshold"),
                                   entry.get("image_threshold_source"))}
