"""Defects of the synthetic demo: a shape (the ground-truth mask) and a painter per defect type.

A defect is drawn as a binary mask first and painted only inside it, so the written mask equals
the changed region exactly (``apply_defect``). Changing anything drawn here changes the images:
bump ``datasets.synthetic.GENERATOR_VERSION``.
"""
import cv2
import numpy as np

from dualmem.datasets.synthetic_render import OBJECT, blob, grid, smooth_noise


def _luma(img):
    return img @ np.array([0.114, 0.587, 0.299], np.float32)


def _pick(rng, mask):
    ys, xs = np.nonzero(mask)
    i = rng.integers(len(xs))
    return float(xs[i]), float(ys[i])


def _site(rng, scene, S, margin):
    """A defect centre: on the object (away from its edge) or anywhere away from the border."""
    if scene.kind == OBJECT:
        k = max(1, int(margin))
        inner = cv2.erode(scene.fg.astype(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8))
        if inner.any():
            return _pick(rng, inner > 0)
        return _pick(rng, scene.fg)
    return tuple(rng.uniform(margin, S - margin, 2))


def _contrast_value(img, mask, rng):
    """Bright or dark, whichever stands out more from what the defect covers."""
    local = float(_luma(img)[mask].mean())
    return rng.uniform(225, 250) if local < 120 else rng.uniform(18, 40)


def _shape_scratch(rng, scene, S):
    cx, cy = _site(rng, scene, S, 0.08 * S)
    length = rng.uniform(0.20, 0.35) * S
    a = rng.uniform(0, np.pi)
    d = np.array([np.cos(a), np.sin(a)]) * length / 2
    n = np.array([-d[1], d[0]]) * rng.uniform(-0.5, 0.5)
    p0, p2 = np.array([cx, cy]) - d, np.array([cx, cy]) + d
    p1 = np.array([cx, cy]) + n
    t = np.linspace(0, 1, 40)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    m = np.zeros((S, S), np.uint8)
    thick = max(2, int(round(0.016 * S)))
    cv2.polylines(m, [np.round(pts * 16).astype(np.int32).reshape(-1, 1, 2)], False, 255,
                  thick, cv2.LINE_8, shift=4)
    return m > 0


def _paint_scratch(rng, img, mask, scene, S):
    val = _contrast_value(img, mask, rng)
    tint = rng.uniform(0.9, 1.05, 3).astype(np.float32)
    streak = 1 + 0.08 * smooth_noise(rng, S, 12)
    img[mask] = img[mask] * 0.12 + (0.88 * val * tint)[None] * streak[mask][:, None]


def _shape_hole(rng, scene, S):
    r = rng.uniform(0.040, 0.065) * S
    cx, cy = _site(rng, scene, S, r + 0.04 * S)
    return blob(rng, S, cx, cy, r, irregular=0.18, n=32)


def _paint_hole(rng, img, mask, scene, S):
    # dark interior, slightly lighter at the rim, like a punched-through hole with a wall
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    depth = np.clip(dist / (dist.max() + 1e-6), 0, 1)
    val = rng.uniform(14, 30) + 35 * (1 - depth) ** 3
    img[mask] = (val[mask][:, None] * np.array([1.0, 1.0, 1.05], np.float32)[None])


_STAIN_COLOURS = np.array([(40, 80, 130), (60, 150, 70), (170, 95, 40), (150, 60, 140)],
                          np.float32)  # BGR: rust, green, blue, purple


def _shape_stain(rng, scene, S):
    r = rng.uniform(0.06, 0.095) * S
    cx, cy = _site(rng, scene, S, r + 0.02 * S)
    return blob(rng, S, cx, cy, r, irregular=0.45, n=28)


def _paint_stain(rng, img, mask, scene, S):
    # one of the two colours farthest from what it covers, so stains are never camouflaged
    dists = np.abs(_STAIN_COLOURS - img[mask].mean(0)).sum(1)
    col = _STAIN_COLOURS[np.argsort(dists)[-2:][rng.integers(2)]]
    alpha = np.clip(0.70 + 0.10 * smooth_noise(rng, S, 10), 0.5, 0.85)[mask][:, None]
    img[mask] = img[mask] * (1 - alpha) + col[None] * alpha


def _shape_missing(rng, scene, S):
    if scene.kind == OBJECT:
        # a bite out of the part's outline: the object is gone, the table shows through
        fg8 = scene.fg.astype(np.uint8)
        edge = fg8 - cv2.erode(fg8, np.ones((3, 3), np.uint8))
        cx, cy = _pick(rng, edge > 0)
        r = rng.uniform(0.08, 0.12) * S
        return blob(rng, S, cx, cy, r, irregular=0.25)
    r = rng.uniform(0.07, 0.10) * S
    cx, cy = _site(rng, scene, S, r + 0.03 * S)
    return blob(rng, S, cx, cy, r, irregular=0.4)


def _paint_missing(rng, img, mask, scene, S):
    if scene.kind == OBJECT:
        img[mask] = scene.background[mask]
        return
    # strands/surface worn away down to a pale backing mesh
    backing = np.array([200, 208, 212], np.float32) * rng.uniform(0.92, 1.0)
    xx, yy = grid(S)
    mesh = 1 - 0.10 * ((np.sin(xx * 0.9) > 0.6) | (np.sin(yy * 0.9) > 0.6))
    img[mask] = backing[None] * mesh[mask][:, None]


def _shape_crack(rng, scene, S):
    cx, cy = _site(rng, scene, S, 0.15 * S)
    m = np.zeros((S, S), np.uint8)
    thick = max(2, int(round(0.013 * S)))

    def walk(x, y, heading, steps):
        pts = [(x, y)]
        for _ in range(steps):
            heading += rng.uniform(-0.6, 0.6)
            step = rng.uniform(0.018, 0.03) * S
            x, y = x + step * np.cos(heading), y + step * np.sin(heading)
            pts.append((x, y))
        cv2.polylines(m, [np.round(np.array(pts) * 16).astype(np.int32).reshape(-1, 1, 2)],
                      False, 255, thick, cv2.LINE_8, shift=4)
        return pts

    h = rng.uniform(0, 2 * np.pi)
    a = walk(cx, cy, h, int(rng.integers(4, 7)))
    walk(cx, cy, h + np.pi, int(rng.integers(4, 7)))
    bx, by = a[len(a) // 2]
    walk(bx, by, h + rng.choice([-1, 1]) * rng.uniform(0.6, 1.1), int(rng.integers(2, 4)))
    return m > 0


def _paint_crack(rng, img, mask, scene, S):
    img[mask] = img[mask] * 0.10 + rng.uniform(10, 25)


def _shape_contamination(rng, scene, S):
    r = rng.uniform(0.035, 0.06) * S
    cx, cy = _site(rng, scene, S, r + 0.03 * S)
    m = blob(rng, S, cx, cy, r, irregular=0.5, n=20)
    for _ in range(int(rng.integers(1, 4))):  # satellite specks next to the main particle
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(1.2, 1.7) * r
        m |= blob(rng, S, cx + d * np.cos(a), cy + d * np.sin(a), r * rng.uniform(0.2, 0.35),
                   irregular=0.3, n=12)
    return m


_CONTAM_COLOURS = np.array([(30, 55, 85), (35, 35, 35), (60, 120, 40), (200, 210, 60)],
                           np.float32)


def _paint_contamination(rng, img, mask, scene, S):
    base = img[mask].mean(0)
    dists = np.abs(_CONTAM_COLOURS - base).sum(1)
    col = _CONTAM_COLOURS[np.argsort(dists)[-2:][rng.integers(2)]]
    tex = 1 + 0.15 * smooth_noise(rng, S, 28)
    img[mask] = col[None] * tex[mask][:, None]


_DEFECTS = {
    "scratch": (_shape_scratch, _paint_scratch),
    "hole": (_shape_hole, _paint_hole),
    "stain": (_shape_stain, _paint_stain),
    "missing": (_shape_missing, _paint_missing),
    "crack": (_shape_crack, _paint_crack),
    "contamination": (_shape_contamination, _paint_contamination),
}


def apply_defect(rng, scene, defect, S):
    """Draw a shape until it is big enough (clipping to the object can shrink it), then paint.

    Object defects are clipped to the object: a defect on the table would not be a defect.
    """
    shape_fn, paint_fn = _DEFECTS[defect]
    min_area = (0.03 * S) ** 2 * (2.0 if defect in ("scratch", "crack") else 4.0)
    clip = scene.fg
    if defect == "missing" and scene.kind == OBJECT:
        # include the anti-aliased rim, or a ghost outline of the lost piece would stay unmasked
        clip = cv2.dilate(scene.fg.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    for _ in range(50):
        mask = shape_fn(rng, scene, S) & clip
        if mask.sum() >= min_area:
            break
    else:  # pragma: no cover - shapes are sized well above min_area
        raise RuntimeError(f"could not place a '{defect}' defect of area >= {min_area:.0f}")
    img = scene.image.copy()
    paint_fn(rng, img, mask, scene, S)
    return img, mask
