"""Pictures of an evaluation: per-image panels, heat-map overlays and ROC plots (OpenCV only).

Panel layout (RGB, one row): ``image | ground truth | heat-map overlay | thresholded map``
under a caption strip, each tile at the model's input size, tiles separated by ``GAP`` white
columns, then the heat map's colour bar (its range, the pixel threshold marked); ``panel_for``
adds a heading strip above with the score, the image threshold, the verdict and the label.
Heat maps are coloured with OpenCV's JET map after normalising either with the class's
min/max over all its test maps ('global', comparable across images; UniAD's vis_compound) or
with each image's own min/max ('per_image', shows structure in normal images). The thresholded
tile shows ``map >= pixel threshold`` in white with the ground-truth outline in green.
"""
from pathlib import Path

import cv2
import numpy as np

from datasets.image_io import LEGACY_RESIZE, read_image, resize_image
from utils.metrics import ranking_curves

HEADER = 18          # caption strip height (pixels)
GAP = 2              # white separator between tiles
VIS_DEFAULTS = {"normalize": "global", "max_images": None, "alpha": 0.5,
                "tensorboard_panels": 8}
# distinguishable line colours (RGB), cycled for more classes
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def vis_settings(cfg):
    """``evaluator.vis`` with defaults filled in; errors name the key."""
    out = dict(VIS_DEFAULTS)
    out.update({k: v for k, v in dict((cfg.get("evaluator") or {}).get("vis") or {}).items()})
    if out["normalize"] not in ("global", "per_image"):
        raise ValueError(f"evaluator.vis.normalize must be 'global' or 'per_image', got "
                         f"{out['normalize']!r}")
    if out["max_images"] is not None and int(out["max_images"]) < 1:
        raise ValueError(f"evaluator.vis.max_images must be >= 1 or null, got "
                         f"{out['max_images']}")
    if not 0.0 <= float(out["alpha"]) <= 1.0:
        raise ValueError(f"evaluator.vis.alpha must be in [0, 1], got {out['alpha']}")
    return out


# ----------------------------------------------------------------------------- single images
def normalize_map(amap, lo=None, hi=None):
    """float32 map in [0, 1]: ``(map - lo) / (hi - lo)`` clipped; lo/hi default to the map's own
    min/max (per-image normalisation). A flat range gives zeros."""
    amap = np.asarray(amap, dtype=np.float32)
    lo = float(amap.min()) if lo is None else float(lo)
    hi = float(amap.max()) if hi is None else float(hi)
    if hi - lo <= 1e-12:
        return np.zeros_like(amap)
    return np.clip((amap - lo) / (hi - lo), 0.0, 1.0)


def colorize(norm):
    """[0, 1] map -> RGB uint8 with the JET colour map (blue low, red high)."""
    u8 = np.round(np.clip(norm, 0.0, 1.0) * 255.0).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay(image, norm, alpha=0.5):
    """Blend the coloured map over an RGB uint8 image (``alpha`` = weight of the image)."""
    heat = colorize(norm)
    if heat.shape[:2] != image.shape[:2]:
        heat = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return cv2.addWeighted(np.ascontiguousarray(image, dtype=np.uint8), float(alpha), heat,
                           1.0 - float(alpha), 0.0)


def _caption(width, text):
    """A white HEADER x width strip with ``text``, clipped to the strip."""
    strip = np.full((HEADER, width, 3), 255, np.uint8)
    scale = max(0.28, min(0.45, width / 500.0))
    cv2.putText(strip, text, (3, HEADER - 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                cv2.LINE_AA)
    return strip


COLORBAR_W = 10      # width of the colour-bar gradient (pixels, at scale 1)


def _fit_scale(text, width, scale, thickness=1, min_scale=0.26):
    """Font scale <= ``scale`` at which ``text`` fits in ``width`` pixels (not below min)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    tw = cv2.getTextSize(text, font, scale, thickness)[0][0]
    return max(min_scale, scale * min(1.0, (width - 4) / max(tw, 1)))


def text_strip(width, text, height=HEADER, color=(0, 0, 0)):
    """A white ``height`` x ``width`` strip with ``text`` scaled down to fit (RGB ``color``)."""
    strip = np.full((height, width, 3), 255, np.uint8)
    scale = _fit_scale(text, width, 0.42 * height / HEADER)
    cv2.putText(strip, text, (3, height - max(4, height // 4)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                tuple(int(c) for c in color), 1, cv2.LINE_AA)
    return strip


def colorbar(height, lo, hi, mark=None, scale=1.0):
    """The JET scale of a heat map as an RGB strip ``height`` high: ``hi`` at the top, ``lo`` at
    the bottom (both labelled), ``mark`` (a threshold in map units) as a black line with its
    value. Width ``colorbar_width(scale)``."""
    bar_w = max(4, int(round(COLORBAR_W * scale)))
    width = colorbar_width(scale)
    out = np.full((height, width, 3), 255, np.uint8)
    ramp = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None]  # top row = hi
    out[:, :bar_w] = colorize(np.repeat(ramp, bar_w, axis=1))
    font, fs = cv2.FONT_HERSHEY_SIMPLEX, 0.3 * scale
    label_w = width - bar_w - 3
    text_h = int(round(9 * scale))

    def label(value, y, color=(60, 60, 60)):
        text = f"{value:.3g}"
        s = _fit_scale(text, label_w + 4, fs, min_scale=0.2)
        y = int(min(max(y, text_h), height - 2))
        cv2.putText(out, text, (bar_w + 2, y), font, s, color, 1, cv2.LINE_AA)

    mark_y = None
    if mark is not None and hi - lo > 1e-12:
        frac = float(np.clip((float(mark) - lo) / (hi - lo), 0.0, 1.0))
        mark_y = int(round((1.0 - frac) * (height - 1)))
        cv2.line(out, (0, mark_y), (bar_w + 1, mark_y), (0, 0, 0), max(1, int(round(scale))))
        label(float(mark), mark_y + text_h // 2, (0, 0, 0))
    for value, y in ((hi, text_h), (lo, height - 2)):
        if mark_y is None or abs(y - text_h // 2 - mark_y) > text_h:  # keep the mark legible
            label(value, y)
    return out


def colorbar_width(scale=1.0):
    """Width of ``colorbar`` (gradient plus value labels)."""
    return max(4, int(round(COLORBAR_W * scale))) + int(round(44 * scale))


def panel_shape(h, w, heading=False, colorbar=True):
    """(height, width, 3) of ``render_panel`` for H x W maps."""
    return (HEADER * (2 if heading else 1) + h,
            4 * w + 3 * GAP + ((GAP + colorbar_width()) if colorbar else 0), 3)


def verdict_text(score, threshold, label=None):
    """(text, RGB colour) stating the image decision: ``score >= threshold`` is anomalous;
    with ``label`` (0/1) also the truth, and 'WRONG' when they differ. No threshold: no
    verdict."""
    if threshold is None:
        text, color = f"score {float(score):.4g} (no threshold)", (0, 0, 0)
        wrong = False
    else:
        anomalous = float(score) >= float(threshold)
        text = (f"score {float(score):.4g} {'>=' if anomalous else '<'} t {float(threshold):.4g}"
                f": {'ANOMALOUS' if anomalous else 'normal'}")
        color = (200, 0, 0) if anomalous else (0, 128, 0)
        wrong = label is not None and anomalous != (int(label) > 0)
    if label is not None:
        text += f"; label {'anomalous' if int(label) > 0 else 'normal'}"
        if wrong:
            text, color = text + " - WRONG", (200, 0, 160)
    return text, color


def annotated_overlay(image, amap, lo=None, hi=None, threshold=None, score=None, verdict=None,
                      pixel_threshold=None, alpha=0.5, name=None):
    """Heat-map overlay for prediction: ``image`` (RGB uint8) blended with ``amap`` (any size,
    resized to the image), a colour bar at the right (range ``lo``..``hi``, per image when None;
    ``pixel_threshold`` marked) and a heading strip: ``name``, the score, the image
    ``threshold`` and the ``verdict`` (True/False = anomalous/normal, None = decided from
    score >= threshold, or a text). Text and bar grow with the image (readable at 1024 px)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape != (h, w):
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    lo = float(amap.min()) if lo is None else float(lo)
    hi = float(amap.max()) if hi is None else float(hi)
    heat = overlay(image, normalize_map(amap, lo, hi), alpha)
    scale = max(1.0, min(h, w) / 256.0)
    gap = int(round(GAP * scale))
    bar = colorbar(h, lo, hi, pixel_threshold, scale)
    body = np.concatenate([heat, np.full((h, gap, 3), 255, np.uint8), bar], axis=1)
    if isinstance(verdict, str):
        text, color = verdict, (0, 0, 0)
    else:
        if verdict is None and threshold is not None and score is not None:
            verdict = float(score) >= float(threshold)
        parts = [] if score is None else [f"score {float(score):.4g}"]
        if threshold is not None:
            parts.append(f"threshold {float(threshold):.4g}")
        decision = {True: "ANOMALOUS", False: "normal"}.get(
            None if verdict is None else bool(verdict), "no verdict")
        text = ", ".join(parts) + (": " if parts else "") + decision
        color = {"ANOMALOUS": (200, 0, 0), "normal": (0, 128, 0)}.get(decision, (0, 0, 0))
    if name:
        text = f"{name}  {text}"
    head = text_strip(body.shape[1], text, int(round(HEADER * scale)), color)
    return np.concatenate([head, body], axis=0)


def _frame(out, amap, lo, hi, pixel_threshold, heading, with_colorbar):
    """A panel's colour bar (beside the tiles) and heading strip (above everything)."""
    if with_colorbar:
        amap = np.asarray(amap, np.float32)
        lo = float(amap.min()) if lo is None else float(lo)
        hi = float(amap.max()) if hi is None else float(hi)
        bar = np.full((out.shape[0], GAP + colorbar_width(), 3), 255, np.uint8)
        bar[HEADER:, GAP:] = colorbar(out.shape[0] - HEADER, lo, hi, pixel_threshold)
        cv2.putText(bar, "map", (GAP + 1, HEADER - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.3,
                    (0, 0, 0), 1, cv2.LINE_AA)
        out = np.concatenate([out, bar], axis=1)
    if heading:
        text, color = heading if isinstance(heading, tuple) else (heading, (0, 0, 0))
        out = np.concatenate([text_strip(out.shape[1], text, HEADER, color), out], axis=0)
    return out


def render_panel(image, gt_mask, amap, lo=None, hi=None, pixel_threshold=None, alpha=0.5,
                 title=None, resize="antialias", heading=None,
                 colorbar=True):
    """One row ``image | ground truth | overlay | thresholded map`` (RGB uint8).

    ``image`` HxWx3 uint8 RGB at the map's size; ``gt_mask`` HxW (> 0.5 anomalous) or None;
    ``lo``/``hi``: normalisation range (None = per image); ``pixel_threshold`` None leaves the
    last tile black; ``resize``: how an image of another size is brought to the map's
    (``dataset.resize``).
    ``heading`` (text, or (text, RGB colour)): a full-width strip on top; ``colorbar``:
    the map's scale at the right, ``pixel_threshold`` marked. Size: ``panel_shape(H, W,
    heading, colorbar)``; the tiles start at row HEADER (2 * HEADER with a heading).
    """
    h, w = amap.shape
    if image.shape[:2] != (h, w):
        image = resize_image(image, (h, w), resize)
    gt = np.zeros((h, w), bool) if gt_mask is None else np.asarray(gt_mask) > 0.5
    gt_tile = np.repeat((gt.astype(np.uint8) * 255)[..., None], 3, axis=2)
    heat = overlay(image, normalize_map(amap, lo, hi), alpha)
    pred = np.zeros((h, w), bool) if pixel_threshold is None else \
        np.asarray(amap, np.float32) >= pixel_threshold
    pred_tile = np.repeat((pred.astype(np.uint8) * 255)[..., None], 3, axis=2)
    if gt.any():
        contours, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(pred_tile, contours, -1, (0, 200, 0), 1)
    out = np.full((HEADER + h, 4 * w + 3 * GAP, 3), 255, np.uint8)
    norm_name = "per-image" if lo is None or hi is None else "global"
    captions = [title or "image", "ground truth", f"heat ({norm_name})",
                "map >= t" if pixel_threshold is None else f"map >= {pixel_threshold:.3g}"]
    for i, (tile, text) in enumerate(zip((image, gt_tile, heat, pred_tile), captions)):
        x0 = i * (w + GAP)
        out[HEADER:, x0:x0 + w] = tile
        out[:HEADER, x0:x0 + w] = _caption(w, text)
    return _frame(out, amap, lo, hi, pixel_threshold, heading, colorbar)


def stack_rows(rows, max_width=None):
    """Panels one above another (white gaps); scaled down to ``max_width`` if wider."""
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    width = max(r.shape[1] for r in rows)
    padded = []
    for r in rows:
        if r.shape[1] < width:
            r = np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
        padded += [r, np.full((GAP, width, 3), 255, np.uint8)]
    grid = np.concatenate(padded[:-1], axis=0)
    if max_width and width > max_width:
        scale = max_width / width
        grid = cv2.resize(grid, (max_width, max(1, round(grid.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    return grid


def write_png(path, rgb):
    """RGB uint8 -> PNG; raises with the path when OpenCV cannot write it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    if not cv2.imwrite(str(path), img):
        raise OSError(f"cannot write image {path}")
    return path


# ----------------------------------------------------------------------------- an evaluation
def defect_name(filename):
    """MVTec layout ``<cls>/test/<defect>/<name>``: the image's parent folder name."""
    return Path(filename).parent.name or "unknown"


def display_image(dataset, index):
    """The test image as the model saw it (input size), in RGB for display."""
    rec = dataset.records[index]
    return resize_image(read_image(dataset.path_of(rec["filename"]), "RGB"), dataset.input_size,
                        getattr(dataset, "resize", LEGACY_RESIZE))


def _norm_range(thresholds, cls, normalize):
    if normalize != "global":
        return None, None
    entry = ((thresholds or {}).get("per_class") or {}).get(cls) or {}
    return entry.get("map_min"), entry.get("map_max")


def panel_for(inf, i, dataset, thresholds, normalize="global", alpha=0.5):
    cls = inf["clsname"][i]
    lo, hi = _norm_range(thresholds, cls, normalize)
    entry = ((thresholds or {}).get("per_class") or {}).get(cls) or {}
    title = f"{defect_name(inf['filename'][i])} {float(inf['score'][i]):.3g}"
    text, color = verdict_text(inf["score"][i], entry.get("image_threshold"),
                               inf["label"][i])
    heading = (text, color)  # the defect and score are in the first tile's caption
    return render_panel(display_image(dataset, int(inf["index"][i])), inf["masks"][i],
                        inf["maps"][i].astype(np.float32), lo, hi,
                        entry.get("pixel_threshold"), alpha, title=title, heading=heading,
                        resize=getattr(dataset, "resize", LEGACY_RESIZE))


def select_for_vis(inf, max_images=None):
    """Indices to draw: all, or per class at most ``max_images`` taken round-robin over the
    defect folders (so every defect type is shown before any gets a second image)."""
    order = []
    clsnames = np.asarray(inf["clsname"])
    for cls in dict.fromkeys(inf["clsname"]):
        idx = np.flatnonzero(clsnames == cls)
        if max_images is None or len(idx) <= max_images:
            order += idx.tolist()
            continue
        by_defect = {}
        for i in idx:
            by_defect.setdefault(defect_name(inf["filename"][i]), []).append(int(i))
        ranked = sorted((rank, d, i) for d, items in by_defect.items()
                        for rank, i in enumerate(items))
        order += sorted(i for _, _, i in ranked[:max_images])
    return order


def write_panels(inf, dataset, thresholds, out_dir, normalize="global", max_images=None,
                 alpha=0.5):
    """Panels as ``<out_dir>/<class>/<defect>/<image stem>.png``; returns the paths."""
    paths = []
    for i in select_for_vis(inf, max_images):
        name = Path(inf["filename"][i])
        path = Path(out_dir) / inf["clsname"][i] / defect_name(name) / (name.stem + ".png")
        paths.append(write_png(path, panel_for(inf, i, dataset, thresholds, normalize, alpha)))
    return paths


def summary_indices(inf, limit=8):
    """For the TensorBoard grid: per class the top-scoring anomalous image (the clearest hit)
    and the top-scoring normal one (the likeliest false alarm), up to ``limit`` panels."""
    chosen = []
    clsnames, labels, scores = np.asarray(inf["clsname"]), inf["label"], inf["score"]
    for cls in dict.fromkeys(inf["clsname"]):
        for want in (1, 0):
            idx = np.flatnonzero((clsnames == cls) & ((labels > 0) == bool(want)))
            if idx.size and len(chosen) < limit:
                chosen.append(int(idx[np.argmax(scores[idx])]))
    return chosen


# ----------------------------------------------------------------------------- ROC plots
def roc_points(scores, labels):
    """Exact ROC polyline (fpr, tpr) of ``score >= t`` over all thresholds, ties as one step,
    from the same curve as ``metrics`` (so its area is the reported AUROC); None if one class."""
    curves = ranking_curves(scores, labels)
    return None if curves is None else curves["roc"]


def draw_roc(curves, title, size=360):
    """ROC plot as RGB uint8: ``curves`` = [(label, (fpr, tpr) or None), ...]; the legend gives
    each curve's area (computed from the drawn polyline), 'n/a' for a one-class curve."""
    img = np.full((size, size, 3), 255, np.uint8)
    left, right, top, bottom = 34, 10, 22, 26
    pw, ph = size - left - right, size - top - bottom

    def px(fx, fy):
        return np.stack([left + np.asarray(fx) * pw, top + (1.0 - np.asarray(fy)) * ph],
                        axis=-1)

    font = cv2.FONT_HERSHEY_SIMPLEX
    for v in np.linspace(0.0, 1.0, 6):
        (x0, y0), = px([v], [0.0]).astype(int)
        (_, y1), = px([0.0], [v]).astype(int)
        cv2.line(img, (x0, top), (x0, top + ph), (225, 225, 225), 1)
        cv2.line(img, (left, y1), (left + pw, y1), (225, 225, 225), 1)
        cv2.putText(img, f"{v:.1f}", (x0 - 9, top + ph + 13), font, 0.33, (60, 60, 60), 1,
                    cv2.LINE_AA)
        cv2.putText(img, f"{v:.1f}", (4, y1 + 4), font, 0.33, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (left + pw, top + ph), (0, 0, 0), 1)
    diag = px([0.0, 1.0], [0.0, 1.0]).astype(int)
    cv2.line(img, tuple(diag[0]), tuple(diag[1]), (170, 170, 170), 1, cv2.LINE_AA)
    cv2.putText(img, title, (left + 6, 15), font, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "FPR", (left + pw // 2 - 10, size - 3), font, 0.35, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(img, "TPR", (2, 15), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    legend_y = top + ph - 6 - 12 * (len(curves) - 1)
    for k, (label, pts) in enumerate(curves):
        color = PALETTE[k % len(PALETTE)]
        if pts is not None:
            x, y = pts
            line = np.round(px(x, y) * 16).astype(np.int32)  # 4 fractional bits: smooth lines
            cv2.polylines(img, [line.reshape(-1, 1, 2)], False, color, 1, cv2.LINE_AA, shift=4)
            area = float(np.sum(np.diff(x) * (y[1:] + y[:-1])) * 0.5)
            text = f"{label} {100 * area:.1f}"
        else:
            text = f"{label} n/a"
        yy = legend_y + 12 * k
        cv2.line(img, (left + pw - 118, yy - 3), (left + pw - 104, yy - 3), color, 2)
        cv2.putText(img, text[:16], (left + pw - 100, yy), font, 0.33, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return img


def roc_figure(inf, pixel=True, size=360):
    """Image ROC (and pixel ROC) per class, side by side."""
    clsnames = np.asarray(inf["clsname"])
    classes = list(dict.fromkeys(inf["clsname"]))
    sel = {c: np.flatnonzero(clsnames == c) for c in classes}
    plots = [draw_roc([(c, roc_points(inf["score"][s], inf["label"][s]))
                       for c, s in sel.items()], "image ROC", size)]
    if pixel:
        plots.append(draw_roc([(c, roc_points(inf["maps"][s], inf["masks"][s]))
                               for c, s in sel.items()], "pixel ROC", size))
    return np.concatenate(plots, axis=1)


def log_evaluation_images(writer, inf, dataset, thresholds, step, vis_cfg=None):
    """TensorBoard at an evaluation: ``val/panels`` (a few panels) and ``val/roc``."""
    vis_cfg = vis_cfg or VIS_DEFAULTS
    rows = [panel_for(inf, i, dataset, thresholds, vis_cfg.get("normalize", "global"),
                      vis_cfg.get("alpha", 0.5))
            for i in summary_indices(inf, int(vis_cfg.get("tensorboard_panels", 8)))]
    grid = stack_rows(rows, max_width=1024)
    if grid is not None:
        writer.add_image("val/panels", grid, step, dataformats="HWC")
    writer.add_image("val/roc", roc_figure(inf), step, dataformats="HWC")
