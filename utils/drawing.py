"""Drawing one picture: heat-map colouring, overlays with a colour bar and a verdict heading,
and the four-tile evaluation panel (OpenCV). ``utils/visualize.py`` lays these out for a whole
evaluation."""
from pathlib import Path

import cv2
import numpy as np

from datasets.image_io import resize_image

HEADER = 18          # caption strip height (pixels)
GAP = 2              # white separator between tiles


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
