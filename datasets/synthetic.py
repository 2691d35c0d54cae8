"""Procedural MVTec-AD-style dataset: the framework's embedded demo, so nothing is downloaded.

Each class is a parametric scene (two objects, two textures) with modest per-image jitter in
pose, colour, lighting and sensor noise, so normal images are similar but never copies. Defects
are painted only inside a binary mask that is written as the ground truth, so masks equal the
defect region exactly. Defects are sized at roughly 5-20 % of the image side: large enough to
show up on a stride-16 feature map, small enough that the image is still mostly normal.

Everything is drawn from ``numpy.random.Generator``s seeded from (seed, class, split, defect,
index), so the same arguments give byte-identical PNGs and changing one count does not reshuffle
the other images.

CLI: ``python -m datasets.synthetic --out DIR [--seed S] [--classes disc weave ...]``
"""
import argparse
import json
import shutil
import sys
import time
import zlib
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from datasets.manifest import build_mvtec_records, read_manifest, write_manifest
from utils.errors import UserError

# Bump whenever the drawing code changes, so ensure_synthetic_dataset regenerates stale copies.
GENERATOR_VERSION = 2

OBJECT, TEXTURE = "object", "texture"
CLASS_SPECS = {
    "disc": (OBJECT, ("scratch", "hole", "stain", "missing")),
    "bracket": (OBJECT, ("scratch", "hole", "contamination", "missing")),
    "weave": (TEXTURE, ("hole", "stain", "scratch", "missing")),
    "marble": (TEXTURE, ("crack", "stain", "hole", "contamination")),
}
DEFAULT_CLASSES = tuple(CLASS_SPECS)
DEFAULT_IMAGE_SIZE = 224
DEFAULT_NUM_TRAIN = 60
DEFAULT_NUM_TEST_GOOD = 10
DEFAULT_NUM_TEST_DEFECT = 4  # per defect type -> 10 + 4 * 4 = 26 test images per class

_SPLIT_CODES = {"train": 1, "test_good": 2, "test_defect": 3}
_DEFECT_CODES = {"scratch": 1, "hole": 2, "stain": 3, "missing": 4, "crack": 5,
                 "contamination": 6}
_COMPLETE = ".complete"


# ----------------------------------------------------------------------------- helpers
def _rng(seed, cls, split, defect, idx):
    """Independent stream per image; crc32 because Python's str hash is salted per process."""
    key = [int(seed), zlib.crc32(cls.encode()), _SPLIT_CODES[split],
           _DEFECT_CODES.get(defect, 0), int(idx)]
    return np.random.default_rng(np.random.SeedSequence(key))


@lru_cache(maxsize=4)
def _grid(S):
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return xx, yy


def _smooth_noise(rng, S, cells):
    """Zero-mean, unit-std value noise with ``cells`` lattice cells across the image."""
    cells = max(2, int(cells))
    small = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    big = cv2.resize(small, (S, S), interpolation=cv2.INTER_CUBIC)
    big -= big.mean()
    return big / (big.std() + 1e-6)


def _fbm(rng, S, base_cells=3, octaves=4):
    """Fractal noise with fixed statistics: every draw looks different but alike."""
    out = np.zeros((S, S), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        out += amp * _smooth_noise(rng, S, base_cells * 2 ** o)
        total += amp
        amp *= 0.5
    return out / total


def _lighting(rng, S, strength=0.05):
    """Gain field: global exposure, a gentle directional gradient and vignetting."""
    xx, yy = _grid(S)
    u, v = xx / (S - 1) - 0.5, yy / (S - 1) - 0.5
    ang = rng.uniform(0, 2 * np.pi)
    grad = rng.uniform(0.3, 1.0) * strength * 2 * (np.cos(ang) * u + np.sin(ang) * v)
    vign = -0.12 * (u * u + v * v)
    return (rng.uniform(0.95, 1.05) * (1 + grad + vign)).astype(np.float32)[..., None]


def _fixed(v):
    """Sub-pixel coordinates for OpenCV drawing with shift=4."""
    return int(round(float(v) * 16))


def _poly_mask(S, pts):
    mask = np.zeros((S, S), np.uint8)
    arr = np.round(np.asarray(pts, np.float64) * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [arr], 255, cv2.LINE_8, shift=4)
    return mask > 0


def _coverage_poly(S, polys):
    """Anti-aliased coverage in [0, 1]; LINE_AA only works on 8-bit images."""
    cov = np.zeros((S, S), np.uint8)
    arrs = [np.round(np.asarray(p, np.float64) * 16).astype(np.int32).reshape(-1, 1, 2)
            for p in polys]
    cv2.fillPoly(cov, arrs, 255, cv2.LINE_AA, shift=4)
    return cov.astype(np.float32) / 255.0


def _blob(rng, S, cx, cy, r, irregular=0.35, n=24, aspect=None):
    """Irregular closed blob: an ellipse whose radius wobbles smoothly with angle."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    wob = np.zeros(n)
    for k in (2, 3, 5):
        wob += rng.uniform(-1, 1) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) / k
    rad = r * (1 + irregular * wob)
    a = aspect if aspect is not None else rng.uniform(0.65, 1.0)
    rot = rng.uniform(0, np.pi)
    x, y = rad * np.cos(t), a * rad * np.sin(t)
    pts = np.stack([cx + x * np.cos(rot) - y * np.sin(rot),
                    cy + x * np.sin(rot) + y * np.cos(rot)], 1)
    return _poly_mask(S, pts)


def _luma(img):
    return img @ np.array([0.114, 0.587, 0.299], np.float32)


# ----------------------------------------------------------------------------- scenes
class _Scene:
    """A clean rendering: image, what lies behind the object (objects only), object mask."""

    def __init__(self, image, background, fg, kind):
        self.image, self.background, self.fg, self.kind = image, background, fg, kind


def _render_disc(rng, S):
    """A bottle cap seen from above: knurled rim, groove, embossed centre, soft shadow."""
    xx, yy = _grid(S)
    bg_col = np.array([198, 200, 204], np.float32) + rng.uniform(-5, 5, 3).astype(np.float32)
    bg = np.empty((S, S, 3), np.float32)
    bg[:] = bg_col
    bg += 3.0 * _smooth_noise(rng, S, 6)[..., None]
    cx, cy = S / 2 + rng.uniform(-0.02, 0.02, 2) * S
    R = 0.31 * S * rng.uniform(0.97, 1.03)
    # shadow cast down-right by a fixed light
    table = bg.copy()  # what a missing piece reveals (its own shadow goes with it)
    sh = np.zeros((S, S), np.uint8)
    cv2.circle(sh, (_fixed(cx + 0.02 * S), _fixed(cy + 0.025 * S)), _fixed(R), 255, -1,
               cv2.LINE_AA, shift=4)
    sh = cv2.GaussianBlur(sh.astype(np.float32) / 255, (0, 0), 0.025 * S)
    bg *= (1 - 0.35 * sh)[..., None]

    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    rn = r / R
    theta = np.arctan2(yy - cy, xx - cx)
    cov = np.clip(R - r + 0.5, 0, 1)
    fg = r <= R

    cap = np.array([48, 62, 176], np.float32) + rng.uniform(-8, 8, 3).astype(np.float32)
    shade = 1 - 0.16 * rn ** 2
    knurl = 0.5 + 0.5 * np.cos(theta * 40 + rng.uniform(0, 2 * np.pi))
    shade = np.where(rn > 0.86, shade * (0.70 + 0.16 * knurl), shade)
    shade *= 1 - 0.30 * np.exp(-((rn - 0.62) / 0.02) ** 2)
    obj = cap * shade[..., None]
    emb = np.clip((0.27 - rn) / 0.01, 0, 1)[..., None]
    obj = obj * (1 - emb) + np.minimum(cap * 1.28, 255) * (1 - 0.1 * rn[..., None]) * emb
    hx, hy = cx - 0.38 * R, cy - 0.38 * R
    hl = np.exp(-(((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * (0.22 * R) ** 2)))
    obj += (55 * hl)[..., None]

    light = _lighting(rng, S)
    img = (bg * (1 - cov[..., None]) + obj * cov[..., None]) * light
    return _Scene(img, table * light, fg, OBJECT)


def _render_bracket(rng, S):
    """A brushed-steel angle bracket with two mounting holes on a dark slate table."""
    xx, yy = _grid(S)
    bg = np.empty((S, S, 3), np.float32)
    bg[:] = np.array([72, 64, 56], np.float32) + rng.uniform(-4, 4, 3).astype(np.float32)
    bg += 3.0 * _smooth_noise(rng, S, 8)[..., None]

    outer = np.array([(-0.32, -0.34), (-0.10, -0.34), (-0.10, 0.10), (0.34, 0.10),
                      (0.34, 0.32), (-0.32, 0.32)])
    holes = np.array([(-0.21, -0.20), (0.21, 0.21)])
    ang = np.deg2rad(rng.uniform(-2.5, 2.5))
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    off = S / 2 + rng.uniform(-0.02, 0.02, 2) * S
    poly = outer * S @ rot.T + off
    hole_c = holes * S @ rot.T + off
    hole_r = 0.045 * S

    cov = _coverage_poly(S, [poly])
    hole_cov = np.zeros((S, S), np.uint8)
    for hc in hole_c:
        cv2.circle(hole_cov, (_fixed(hc[0]), _fixed(hc[1])), _fixed(hole_r), 255, -1,
                   cv2.LINE_AA, shift=4)
    cov = cov * (1 - hole_cov.astype(np.float32) / 255)

    table = bg.copy()  # what a missing piece reveals (its own shadow goes with it)
    sh = np.roll(cov, (int(0.02 * S), int(0.02 * S)), (0, 1))
    sh = cv2.GaussianBlur(sh, (0, 0), 0.02 * S)
    bg *= (1 - 0.45 * sh)[..., None]

    steel = np.array([168, 170, 174], np.float32) + rng.uniform(-6, 6)
    brushed = rng.standard_normal((S, S)).astype(np.float32)
    brushed = cv2.GaussianBlur(brushed, (0, 0), sigmaX=0.08 * S, sigmaY=0.6)
    brushed /= brushed.std() + 1e-6
    obj = steel * (1 + 0.05 * brushed)[..., None]
    # bevel: light catches the outline of the part and of the holes
    edge = cov - cv2.erode(cov, np.ones((3, 3), np.uint8), iterations=2)
    obj += (40 * np.clip(edge, 0, 1))[..., None]
    u = (xx - off[0]) / S
    obj *= (1 + 0.10 * u)[..., None]

    light = _lighting(rng, S)
    img = (bg * (1 - cov[..., None]) + obj * cov[..., None]) * light
    return _Scene(img, table * light, cov >= 0.5, OBJECT)


def _render_weave(rng, S):
    """Basket weave: cells of three strands alternating direction, darker where strands dive."""
    xx, yy = _grid(S)
    p = S / 9 * rng.uniform(0.98, 1.02)
    th = np.deg2rad(rng.uniform(-2, 2))
    ox, oy = rng.uniform(0, 2 * p, 2)
    u = ((xx - ox) * np.cos(th) + (yy - oy) * np.sin(th)) / p
    v = (-(xx - ox) * np.sin(th) + (yy - oy) * np.cos(th)) / p
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    par = ((iu + iv) % 2 == 0)
    across = np.where(par, fu, fv) * 3
    along = np.where(par, fv, fu)
    strand = 0.50 + 0.50 * np.sin(np.pi * (across - np.floor(across))) ** 0.7
    ends = np.sin(np.pi * along) ** 0.4
    lum = strand * (0.55 + 0.45 * ends)
    fibre = rng.standard_normal((S, S)).astype(np.float32)
    fib_h = cv2.GaussianBlur(fibre, (0, 0), sigmaX=2.5, sigmaY=0.5)
    fib_v = cv2.GaussianBlur(fibre, (0, 0), sigmaX=0.5, sigmaY=2.5)
    fib = np.where(par, fib_v, fib_h)
    lum = lum * (1 + 0.08 * fib / (fib.std() + 1e-6))
    jitter = rng.uniform(-6, 6, 3).astype(np.float32)
    col_a = np.array([112, 168, 206], np.float32) + jitter
    col_b = np.array([96, 150, 190], np.float32) + jitter
    col = np.where(par[..., None], col_a, col_b)
    img = col * lum[..., None] * _lighting(rng, S, 0.03)
    return _Scene(img, None, np.ones((S, S), bool), TEXTURE)


def _render_marble(rng, S):
    """Polished marble: soft veins bent by fractal noise, faint hairline veins, cloudy base."""
    xx, yy = _grid(S)
    t = _fbm(rng, S, 2, 5)
    ang = np.deg2rad(30 + rng.uniform(-8, 8))
    s = (xx * np.cos(ang) + yy * np.sin(ang)) / S
    v = np.sin(2 * np.pi * (2.0 * s + rng.uniform(0, 1)) + 2.5 * t)
    vein = (1 - np.abs(v)) ** 6
    hair = np.clip(1 - np.abs(_fbm(rng, S, 4, 4)) / 0.06, 0, 1) ** 2
    cloud = _smooth_noise(rng, S, 4)
    base = np.array([204, 214, 224], np.float32) + rng.uniform(-5, 5, 3).astype(np.float32)
    vein_col = np.array([140, 145, 152], np.float32)
    vmix = np.clip(0.6 * vein + 0.2 * hair, 0, 1)[..., None]
    img = base * (1 + 0.03 * cloud[..., None]) * (1 - vmix) + vein_col * vmix
    grain = cv2.GaussianBlur(rng.standard_normal((S, S)).astype(np.float32), (0, 0), 0.8)
    img += (5 * grain / (grain.std() + 1e-6))[..., None]
    img *= _lighting(rng, S, 0.03)
    return _Scene(img, None, np.ones((S, S), bool), TEXTURE)


_RENDERERS = {"disc": _render_disc, "bracket": _render_bracket,
              "weave": _render_weave, "marble": _render_marble}


# ----------------------------------------------------------------------------- defects
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
    streak = 1 + 0.08 * _smooth_noise(rng, S, 12)
    img[mask] = img[mask] * 0.12 + (0.88 * val * tint)[None] * streak[mask][:, None]


def _shape_hole(rng, scene, S):
    r = rng.uniform(0.040, 0.065) * S
    cx, cy = _site(rng, scene, S, r + 0.04 * S)
    return _blob(rng, S, cx, cy, r, irregular=0.18, n=32)


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
    return _blob(rng, S, cx, cy, r, irregular=0.45, n=28)


def _paint_stain(rng, img, mask, scene, S):
    # one of the two colours farthest from what it covers, so stains are never camouflaged
    dists = np.abs(_STAIN_COLOURS - img[mask].mean(0)).sum(1)
    col = _STAIN_COLOURS[np.argsort(dists)[-2:][rng.integers(2)]]
    alpha = np.clip(0.70 + 0.10 * _smooth_noise(rng, S, 10), 0.5, 0.85)[mask][:, None]
    img[mask] = img[mask] * (1 - alpha) + col[None] * alpha


def _shape_missing(rng, scene, S):
    if scene.kind == OBJECT:
        # a bite out of the part's outline: the object is gone, the table shows through
        fg8 = scene.fg.astype(np.uint8)
        edge = fg8 - cv2.erode(fg8, np.ones((3, 3), np.uint8))
        cx, cy = _pick(rng, edge > 0)
        r = rng.uniform(0.08, 0.12) * S
        return _blob(rng, S, cx, cy, r, irregular=0.25)
    r = rng.uniform(0.07, 0.10) * S
    cx, cy = _site(rng, scene, S, r + 0.03 * S)
    return _blob(rng, S, cx, cy, r, irregular=0.4)


def _paint_missing(rng, img, mask, scene, S):
    if scene.kind == OBJECT:
        img[mask] = scene.background[mask]
        return
    # strands/surface worn away down to a pale backing mesh
    backing = np.array([200, 208, 212], np.float32) * rng.uniform(0.92, 1.0)
    xx, yy = _grid(S)
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
    m = _blob(rng, S, cx, cy, r, irregular=0.5, n=20)
    for _ in range(int(rng.integers(1, 4))):  # satellite specks next to the main particle
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(1.2, 1.7) * r
        m |= _blob(rng, S, cx + d * np.cos(a), cy + d * np.sin(a), r * rng.uniform(0.2, 0.35),
                   irregular=0.3, n=12)
    return m


_CONTAM_COLOURS = np.array([(30, 55, 85), (35, 35, 35), (60, 120, 40), (200, 210, 60)],
                           np.float32)


def _paint_contamination(rng, img, mask, scene, S):
    base = img[mask].mean(0)
    dists = np.abs(_CONTAM_COLOURS - base).sum(1)
    col = _CONTAM_COLOURS[np.argsort(dists)[-2:][rng.integers(2)]]
    tex = 1 + 0.15 * _smooth_noise(rng, S, 28)
    img[mask] = col[None] * tex[mask][:, None]


_DEFECTS = {
    "scratch": (_shape_scratch, _paint_scratch),
    "hole": (_shape_hole, _paint_hole),
    "stain": (_shape_stain, _paint_stain),
    "missing": (_shape_missing, _paint_missing),
    "crack": (_shape_crack, _paint_crack),
    "contamination": (_shape_contamination, _paint_contamination),
}


def _apply_defect(rng, scene, defect, S):
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


def _finish(rng, img):
    """Sensor noise after the defect, so defect pixels are not tellable by being noise-free."""
    img = img + rng.normal(0, 2.0, img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _write_png(path, arr):
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover
        raise IOError(f"PNG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def render_sample(cls, seed=0, split="train", defect=None, idx=0, image_size=DEFAULT_IMAGE_SIZE):
    """One image (BGR uint8) and its mask (uint8 0/255, or None) exactly as the generator makes it.

    Exposed so previews and tests can draw a sample without writing a dataset.
    """
    if cls not in CLASS_SPECS:
        raise UserError(f"unknown synthetic class '{cls}'; available: {list(CLASS_SPECS)}")
    if defect is not None and defect not in CLASS_SPECS[cls][1]:
        raise UserError(f"class '{cls}' has no defect '{defect}'; "
                         f"available: {list(CLASS_SPECS[cls][1])}")
    S = int(image_size)
    rng = _rng(seed, cls, split if defect is None else "test_defect", defect, idx)
    scene = _RENDERERS[cls](rng, S)
    if defect is None:
        return _finish(rng, scene.image), None
    img, mask = _apply_defect(rng, scene, defect, S)
    return _finish(rng, img), (mask.astype(np.uint8) * 255)


# ----------------------------------------------------------------------------- dataset
def _params(classes, image_size, num_train, num_test_good, num_test_defect, seed):
    if classes is None:
        classes = list(DEFAULT_CLASSES)
    elif isinstance(classes, str):
        classes = [classes]
    classes = list(classes)
    unknown = [c for c in classes if c not in CLASS_SPECS]
    if unknown:
        raise UserError(f"unknown synthetic class(es) {unknown}; available: {list(CLASS_SPECS)}")
    if len(set(classes)) != len(classes):
        raise UserError(f"duplicate classes in {classes}")
    if int(image_size) < 64:
        raise UserError(f"image_size must be >= 64, got {image_size}")
    for name, n in (("num_train", num_train), ("num_test_good", num_test_good),
                    ("num_test_defect", num_test_defect)):
        if int(n) < 0:
            raise UserError(f"{name} must be >= 0, got {n}")
    if int(num_train) < 1:
        raise UserError("num_train must be >= 1 (a class needs training images)")
    if int(seed) < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    return {"version": GENERATOR_VERSION, "classes": classes, "image_size": int(image_size),
            "num_train": int(num_train), "num_test_good": int(num_test_good),
            "num_test_defect": int(num_test_defect), "seed": int(seed)}


def generate_synthetic_dataset(root, classes=None, image_size=DEFAULT_IMAGE_SIZE,
                               num_train=DEFAULT_NUM_TRAIN, num_test_good=DEFAULT_NUM_TEST_GOOD,
                               num_test_defect=DEFAULT_NUM_TEST_DEFECT, seed=0, overwrite=False):
    """Write an MVTec-AD-layout dataset under ``root``; ``num_test_defect`` is per defect type.

    Existing class folders are an error unless ``overwrite`` (then only those folders are
    replaced), so a typo in ``root`` cannot wipe an unrelated directory.
    """
    p = _params(classes, image_size, num_train, num_test_good, num_test_defect, seed)
    root = Path(root)
    S = p["image_size"]
    if not overwrite:
        clash = [c for c in p["classes"] if (root / c).exists()]
        if clash:
            raise FileExistsError(f"class folder(s) {clash} already exist in {root}; "
                                  f"pass overwrite=True to replace them")
    root.mkdir(parents=True, exist_ok=True)
    (root / _COMPLETE).unlink(missing_ok=True)  # contents are about to change

    summary = {"root": str(root), "classes": list(p["classes"]), "image_size": S,
               "seed": p["seed"], "counts": {}, "defect_types": {}}
    for cls in p["classes"]:
        cdir = root / cls
        if cdir.exists():
            shutil.rmtree(cdir)
        defects = CLASS_SPECS[cls][1]
        (cdir / "train" / "good").mkdir(parents=True)
        (cdir / "test" / "good").mkdir(parents=True)
        for i in range(p["num_train"]):
            img, _ = render_sample(cls, p["seed"], "train", None, i, S)
            _write_png(cdir / "train" / "good" / f"{i:03d}.png", img)
        for i in range(p["num_test_good"]):
            img, _ = render_sample(cls, p["seed"], "test_good", None, i, S)
            _write_png(cdir / "test" / "good" / f"{i:03d}.png", img)
        for d in defects:
            if p["num_test_defect"] == 0:
                break
            (cdir / "test" / d).mkdir(parents=True)
            (cdir / "ground_truth" / d).mkdir(parents=True)
            for i in range(p["num_test_defect"]):
                img, mask = render_sample(cls, p["seed"], "test_defect", d, i, S)
                _write_png(cdir / "test" / d / f"{i:03d}.png", img)
                _write_png(cdir / "ground_truth" / d / f"{i:03d}_mask.png", mask)
        summary["defect_types"][cls] = list(defects)
        summary["counts"][cls] = {
            "train": p["num_train"], "test_good": p["num_test_good"],
            "test_defect": {d: p["num_test_defect"] for d in defects},
            "test_total": p["num_test_good"] + p["num_test_defect"] * len(defects)}
    return summary


def ensure_synthetic_dataset(root, force=False, **kwargs):
    """Generate (and write train.json / test.json) unless a complete copy with equal params exists.

    The ``.complete`` marker is written last, so an interrupted run is simply redone next time.
    Not safe for several processes generating the same root at once: let rank 0 call it.
    """
    root = Path(root)
    p = _params(kwargs.pop("classes", None), kwargs.pop("image_size", DEFAULT_IMAGE_SIZE),
                kwargs.pop("num_train", DEFAULT_NUM_TRAIN),
                kwargs.pop("num_test_good", DEFAULT_NUM_TEST_GOOD),
                kwargs.pop("num_test_defect", DEFAULT_NUM_TEST_DEFECT), kwargs.pop("seed", 0))
    if kwargs:
        raise TypeError(f"unexpected argument(s) {sorted(kwargs)}")
    marker = root / _COMPLETE
    done = False
    if not force and marker.is_file():
        try:
            done = json.loads(marker.read_text()) == p
        except (OSError, ValueError):
            done = False
        done = done and all((root / c / "train" / "good").is_dir() for c in p["classes"]) \
            and (root / "train.json").is_file() and (root / "test.json").is_file()
    if done:
        return root
    marker.unlink(missing_ok=True)
    generate_synthetic_dataset(root, p["classes"], p["image_size"], p["num_train"],
                               p["num_test_good"], p["num_test_defect"], p["seed"],
                               overwrite=True)
    train, test = build_mvtec_records(root, p["classes"])
    write_manifest(root / "train.json", train)
    write_manifest(root / "test.json", test)
    tmp = root / (_COMPLETE + ".tmp")
    tmp.write_text(json.dumps(p, indent=1) + "\n")
    tmp.replace(marker)
    return root


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m datasets.synthetic",
                                 description="Generate the synthetic MVTec-style demo dataset.")
    ap.add_argument("--out", required=True, help="dataset root to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", nargs="+", default=None, choices=list(CLASS_SPECS))
    ap.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    ap.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    ap.add_argument("--num-test-good", type=int, default=DEFAULT_NUM_TEST_GOOD)
    ap.add_argument("--num-test-defect", type=int, default=DEFAULT_NUM_TEST_DEFECT,
                    help="test images per defect type")
    ap.add_argument("--force", action="store_true", help="regenerate even if complete")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    root = ensure_synthetic_dataset(a.out, force=a.force, classes=a.classes,
                                    image_size=a.image_size, num_train=a.num_train,
                                    num_test_good=a.num_test_good,
                                    num_test_defect=a.num_test_defect, seed=a.seed)
    train, test = read_manifest(root / "train.json"), read_manifest(root / "test.json")
    print(f"synthetic dataset ready at {root} ({len(train)} train, {len(test)} test images, "
          f"{time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
