"""Drawing one picture: heat-map colouring, overlays with a colour bar and a verdict heading,
and the four-tile evaluation panel (OpenCV). ``utils/visualize.py`` lays these out for a whole
evaluation."""
from pathlib import Path

import cv2
import numpy as np

from dualmem.datasets.image_io import resize_image

HEADER = 18          # caption strip height (pixels)
GAP = 2              # white separator between tiles
FONT = cv2.FONT_HERSHEY_SIMPLEX


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
    cv2.putText(strip, text, (3, HEADER - 5), FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


COLORBAR_W = 10      # width of the colour-bar gradient (pixels, at scale 1)
LABEL_W = 46         # width of its value labels (pixels, at scale 1)
TITLE_W = 12         # width of its rotated title (pixels, at scale 1)
# the colour bar's title, longest first: the first that fits the bar's height is drawn
BAR_TITLES = ("anomaly score (black line: threshold)", "anomaly score, threshold marked",
              "anomaly score", "score")
# image-score rules whose threshold is in the map's own units (a local maximum or a top-k
# mean of the map): that threshold is the one the colour scale is centred on
MAP_UNIT_RULES = ("max", "topk")


def calibrated_range(entry, image_threshold=None, pixel_threshold=None, reduction="max"):
    """(lo, hi, t): the fixed colour scale of a class, from its calibration (the evaluation's
    thresholds entry: ``map_min``, ``map_max``). ``t`` sits at the middle of the bar: lo = the
    smallest map value of the calibration, hi = 2t - lo, so every image of the class is drawn
    on one scale, green-yellow is the threshold and red lies above it (a scale set by the worst
    test defect drew a part just over the threshold all blue). ``t`` is the image threshold when
    the score rule reads the map in its own units (``MAP_UNIT_RULES``), else the pixel
    threshold. Without either: the calibration's (min, max) and no mark; without those either:
    (None, None, None), i.e. each image's own range."""
    entry = entry or {}
    map_min, map_max = entry.get("map_min"), entry.get("map_max")
    t = image_threshold if reduction in MAP_UNIT_RULES else None
    t = pixel_threshold if t is None else t
    if t is None:
        return map_min, map_max, None
    t = float(t)
    if map_min is not None and float(map_min) < t:
        lo = float(map_min)
    else:  # no calibration range, or a threshold at its very bottom
        up = float(map_max) - t if map_max is not None and float(map_max) > t else 0.0
        lo = t - (up or abs(t) or 1.0)
    return lo, 2.0 * t - lo, t


def _fit_scale(text, width, scale, thickness=1, min_scale=0.26):
    """Font scale <= ``scale`` at which ``text`` fits in ``width`` pixels (not below min)."""
    tw = cv2.getTextSize(text, FONT, scale, thickness)[0][0]
    return max(min_scale, scale * min(1.0, (width - 4) / max(tw, 1)))


def _fits(text, width, scale):
    return cv2.getTextSize(text, FONT, scale, 1)[0][0] <= width - 6


def wrap_text(text, width, scale):
    """``text`` broken into lines that each fit ``width`` pixels at font ``scale``: at spaces,
    and inside a word only when the word alone is too long."""
    lines, cur = [], ""
    for word in text.split():
        cand = f"{cur} {word}" if cur else word
        if _fits(cand, width, scale):
            cur = cand
            continue
        if cur:
            lines.append(cur)
        while not _fits(word, width, scale) and len(word) > 1:
            cut = max(1, max(k for k in range(1, len(word) + 1)
                             if k == 1 or _fits(word[:k], width, scale)))
            lines.append(word[:cut])
            word = word[cut:]
        cur = word
    return lines + [cur] if cur or not lines else lines


def text_strip(width, text, height=HEADER, color=(0, 0, 0)):
    """White strip(s) ``height`` high per line, ``width`` wide, with ``text`` in RGB ``color``:
    one line when it fits (slightly smaller if need be), else wrapped onto more lines at a
    readable size, never clipped."""
    nominal = 0.42 * height / HEADER
    scale = _fit_scale(text, width, nominal)
    lines = [text] if scale >= 0.85 * nominal and _fits(text, width, scale) else \
        wrap_text(text, width, nominal)
    if len(lines) > 1:
        scale = nominal
    strip = np.full((height * len(lines), width, 3), 255, np.uint8)
    for k, line in enumerate(lines):
        cv2.putText(strip, line, (3, (k + 1) * height - max(4, height // 4)), FONT, scale,
                    tuple(int(c) for c in color), 1, cv2.LINE_AA)
    return strip


def _rotated_title(height, width, scale):
    """The colour bar's title written bottom to top in a ``width`` x ``height`` column: the
    longest of ``BAR_TITLES`` that fits."""
    fs = 0.34 * scale
    text = next((t for t in BAR_TITLES if _fits(t, height, fs)), None)
    col = np.full((width, height, 3), 255, np.uint8)  # drawn lying down, then turned
    if text is None:
        text, fs = BAR_TITLES[-1], _fit_scale(BAR_TITLES[-1], height, fs, min_scale=0.2)
    tw = cv2.getTextSize(text, FONT, fs, 1)[0][0]
    cv2.putText(col, text, (max(1, (height - tw) // 2), width - max(2, width // 4)), FONT, fs,
                (0, 0, 0), 1, cv2.LINE_AA)
    return np.ascontiguousarray(np.rot90(col))


def colorbar(height, lo, hi, mark=None, scale=1.0, title=True):
    """The JET scale of a heat map as an RGB strip ``height`` high: ``hi`` at the top, ``lo``
    at the bottom, five labelled ticks, ``mark`` (the threshold, map units) as a black line
    across the gradient with a pointer and its value in black, and a rotated title at the right
    ("anomaly score (black line: threshold)"). Width ``colorbar_width(scale)``."""
    bar_w = max(4, int(round(COLORBAR_W * scale)))
    width = colorbar_width(scale, title)
    out = np.full((height, width, 3), 255, np.uint8)
    ramp = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None]  # top row = hi
    out[:, :bar_w] = colorize(np.repeat(ramp, bar_w, axis=1))
    fs, text_h = 0.34 * scale, int(round(9 * scale))
    tick = max(2, int(round(3 * scale)))
    label_x, label_w = bar_w + tick + 1, int(round(LABEL_W * scale))
    span = hi - lo if lo is not None and hi is not None else 0.0

    def y_of(value):
        frac = float(np.clip((float(value) - lo) / span, 0.0, 1.0))
        return int(round((1.0 - frac) * (height - 1)))

    def label(value, y, color, shift=0):
        text = f"{value:.3g}"
        s = _fit_scale(text, label_w + 4 - shift, fs, min_scale=0.2)
        base = int(min(max(y + text_h // 2, text_h), height - 2))
        cv2.putText(out, text, (label_x + shift, base), FONT, s, color, 1, cv2.LINE_AA)
        return base

    taken = []  # baselines of the labels drawn, so that none overlaps another
    if mark is not None and span > 1e-12:
        y = y_of(mark)
        lw = max(1, int(round(1.5 * scale)))
        cv2.line(out, (0, y), (bar_w - 1, y), (0, 0, 0), lw)
        tri = np.array([[bar_w, y], [bar_w + tick + 1, y - tick], [bar_w + tick + 1, y + tick]])
        cv2.fillConvexPoly(out, tri.astype(np.int32), (0, 0, 0), cv2.LINE_AA)
        taken.append(label(float(mark), y, (0, 0, 0), shift=2))
    if span > 1e-12:
        for frac in (1.0, 0.75, 0.5, 0.25, 0.0):
            value = lo + frac * span
            y = y_of(value)
            base = int(min(max(y + text_h // 2, text_h), height - 2))
            if all(abs(base - b) > text_h + 1 for b in taken):
                cv2.line(out, (bar_w, y), (bar_w + tick - 1, y), (90, 90, 90), 1)
                taken.append(label(value, y, (70, 70, 70)))
    if title:
        tw = int(round(TITLE_W * scale))
        out[:, width - tw:] = _rotated_title(height, tw, scale)
    return out


def colorbar_width(scale=1.0, title=True):
    """Width of ``colorbar`` (gradient, ticks, value labels and the rotated title)."""
    return max(4, int(round(COLORBAR_W * scale))) + max(2, int(round(3 * scale))) + 1 + \
        int(round(LABEL_W * scale)) + (int(round(TITLE_W * scale)) if title else 0)


def panel_shape(h, w, heading=False, colorbar=True):
    """(height, width, 3) of ``render_panel`` for H x W maps (a heading of one line; a longer
    one wraps onto more HEADER-high lines)."""
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


def overlay_heading(score=None, threshold=None, verdict=None, name=None):
    """(text, RGB colour) of a prediction's heading, the decision first so that it stays on
    the first line when the text wraps: ``name: ANOMALOUS, score 0.0487 >= threshold 0.0325``.
    ``verdict``: True/False = anomalous/normal, None = decided from score >= threshold, or a
    text."""
    if isinstance(verdict, str):
        return (f"{name}: {verdict}" if name else verdict), (0, 0, 0)
    if verdict is None and threshold is not None and score is not None:
        verdict = float(score) >= float(threshold)
    decision = {True: "ANOMALOUS", False: "normal"}.get(
        None if verdict is None else bool(verdict), "no verdict")
    parts = [] if score is None else [f"score {float(score):.4g}"]
    if threshold is not None:
        rel = "" if score is None else (">= " if float(score) >= float(threshold) else "< ")
        parts.append(f"{rel}threshold {float(threshold):.4g}")
    text = (f"{name}: " if name else "") + decision + (", " + " ".join(parts) if parts else "")
    color = {"ANOMALOUS": (200, 0, 0), "normal": (0, 128, 0)}.get(decision, (0, 0, 0))
    return text, color


def annotated_overlay(image, amap, lo=None, hi=None, threshold=None, score=None, verdict=None,
                      pixel_threshold=None, alpha=0.5, name=None, mark=None):
    """Heat-map overlay for prediction: ``image`` (RGB uint8) blended with ``amap`` (any size,
    resized to the image), a colour bar at the right (range ``lo``..``hi``, per image when None;
    ``mark`` marked, default ``pixel_threshold``: ``calibrated_range`` gives the fixed scale
    and its threshold) and a heading (``overlay_heading``: name, verdict, score, threshold),
    wrapped rather than clipped. Text and bar grow with the image (readable at 1024 px)."""
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
    bar = colorbar(h, lo, hi, pixel_threshold if mark is None else mark, scale)
    body = np.concatenate([heat, np.full((h, gap, 3), 255, np.uint8), bar], axis=1)
    text, color = overlay_heading(score, threshold, verdict, name)
    head = text_strip(body.shape[1], text, int(round(HEADER * scale)), color)
    return np.concatenate([head, body], axis=0)


def _frame(out, amap, lo, hi, mark, heading, with_colorbar):
    """A panel's colour bar (beside the tiles) and heading strip (above everything)."""
    if with_colorbar:
        amap = np.asarray(amap, np.float32)
        lo = float(amap.min()) if lo is None else float(lo)
        hi = float(amap.max()) if hi is None else float(hi)
        bar = np.full((out.shape[0], GAP + colorbar_width(), 3), 255, np.uint8)
        bar[HEADER:, GAP:] = colorbar(out.shape[0] - HEADER, lo, hi, mark)
        out = np.concatenate([out, bar], axis=1)
    if heading:
        text, color = heading if isinstance(heading, tuple) else (heading, (0, 0, 0))
        out = np.concatenate([text_strip(out.shape[1], text, HEADER, color), out], axis=0)
    return out


def _note_tile(h, w, text):
    """A light grey tile saying why there is nothing to show (no mask, no threshold)."""
    tile = np.full((h, w, 3), 225, np.uint8)
    lines = wrap_text(text, w, 0.4)
    y0 = h // 2 - 7 * (len(lines) - 1)
    for k, line in enumerate(lines):
        tw = cv2.getTextSize(line, FONT, 0.4, 1)[0][0]
        cv2.putText(tile, line, (max(2, (w - tw) // 2), y0 + 14 * k + 4), FONT, 0.4,
                    (60, 60, 60), 1, cv2.LINE_AA)
    return tile


def render_panel(image, gt_mask, amap, lo=None, hi=None, pixel_threshold=None, alpha=0.5,
                 title=None, resize="antialias", heading=None,
                 colorbar=True, mark=None, no_mask=False):
    """One row ``image | ground truth | overlay | thresholded map`` (RGB uint8).

    ``image`` HxWx3 uint8 RGB at the map's size; ``gt_mask`` HxW (> 0.5 anomalous) or None;
    ``lo``/``hi``: colour range (None = per image; ``calibrated_range`` gives the class's
    fixed one); ``pixel_threshold`` None: the last tile says "no pixel threshold" (nothing to
    threshold by); ``no_mask``: the class has no ground-truth masks, the second tile says so
    instead of a blank truth; ``resize``: how an image of another size is brought to the map's
    (``dataset.resize``).
    ``heading`` (text, or (text, RGB colour)): a full-width strip on top (wrapped when long);
    ``colorbar``: the map's scale at the right, ``mark`` (default ``pixel_threshold``) marked.
    Size: ``panel_shape(H, W, heading, colorbar)`` for a one-line heading; the tiles start at
    row HEADER (2 * HEADER with a one-line heading).
    """
    h, w = amap.shape
    if image.shape[:2] != (h, w):
        image = resize_image(image, (h, w), resize)
    gt = np.zeros((h, w), bool) if gt_mask is None or no_mask else np.asarray(gt_mask) > 0.5
    gt_tile = _note_tile(h, w, "no mask") if no_mask else \
        np.repeat((gt.astype(np.uint8) * 255)[..., None], 3, axis=2)
    heat = overlay(image, normalize_map(amap, lo, hi), alpha)
    if pixel_threshold is None:
        pred_tile = _note_tile(h, w, "no pixel threshold")
    else:
        pred = np.asarray(amap, np.float32) >= pixel_threshold
        pred_tile = np.repeat((pred.astype(np.uint8) * 255)[..., None], 3, axis=2)
    if gt.any() and pixel_threshold is not None:
        contours, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(pred_tile, contours, -1, (0, 200, 0), 1)
    out = np.full((HEADER + h, 4 * w + 3 * GAP, 3), 255, np.uint8)
    norm_name = "per image" if lo is None or hi is None else "fixed"
    captions = [title or "image", "no mask" if no_mask else "ground truth",
                f"heat ({norm_name})",
                "no pixel threshold" if pixel_threshold is None else
                f"map >= {pixel_threshold:.3g}"]
    for i, (tile, text) in enumerate(zip((image, gt_tile, heat, pred_tile), captions)):
        x0 = i * (w + GAP)
        out[HEADER:, x0:x0 + w] = tile
        out[:HEADER, x0:x0 + w] = _caption(w, text)
    return _frame(out, amap, lo, hi, pixel_threshold if mark is None else mark, heading,
                  colorbar)


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
