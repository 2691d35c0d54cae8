"""The synthetic demo's clean scenes: two objects and two textures, each drawn procedurally.

Each renderer takes a seeded ``numpy.random.Generator`` and the image side ``S`` and returns a
:class:`Scene` (float32 BGR image before sensor noise, what lies behind an object, the object
mask). The noise, lighting and polygon primitives here are shared with the defect painters in
``datasets/synthetic_defects.py``; ``datasets/synthetic.py`` seeds and assembles them.
Changing anything drawn here changes the images: bump ``datasets.synthetic.GENERATOR_VERSION``.
"""
from functools import lru_cache

import cv2
import numpy as np

OBJECT, TEXTURE = "object", "texture"


@lru_cache(maxsize=4)
def grid(S):
    """Read-only pixel coordinates (x, y) of an S x S image, shared by every drawing."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return xx, yy


def smooth_noise(rng, S, cells):
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
        out += amp * smooth_noise(rng, S, base_cells * 2 ** o)
        total += amp
        amp *= 0.5
    return out / total


def _lighting(rng, S, strength=0.05):
    """Gain field: global exposure, a gentle directional gradient and vignetting."""
    xx, yy = grid(S)
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


def blob(rng, S, cx, cy, r, irregular=0.35, n=24, aspect=None):
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



# ----------------------------------------------------------------------------- scenes
class Scene:
    """A clean rendering: image, what lies behind the object (objects only), object mask."""

    def __init__(self, image, background, fg, kind):
        self.image, self.background, self.fg, self.kind = image, background, fg, kind


def _render_disc(rng, S):
    """A bottle cap seen from above: knurled rim, groove, embossed centre, soft shadow."""
    xx, yy = grid(S)
    bg_col = np.array([198, 200, 204], np.float32) + rng.uniform(-5, 5, 3).astype(np.float32)
    bg = np.empty((S, S, 3), np.float32)
    bg[:] = bg_col
    bg += 3.0 * smooth_noise(rng, S, 6)[..., None]
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
    return Scene(img, table * light, fg, OBJECT)


def _render_bracket(rng, S):
    """A brushed-steel angle bracket with two mounting holes on a dark slate table."""
    xx, yy = grid(S)
    bg = np.empty((S, S, 3), np.float32)
    bg[:] = np.array([72, 64, 56], np.float32) + rng.uniform(-4, 4, 3).astype(np.float32)
    bg += 3.0 * smooth_noise(rng, S, 8)[..., None]

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
    return Scene(img, table * light, cov >= 0.5, OBJECT)


def _render_weave(rng, S):
    """Basket weave: cells of three strands alternating direction, darker where strands dive."""
    xx, yy = grid(S)
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
    return Scene(img, None, np.ones((S, S), bool), TEXTURE)


def _render_marble(rng, S):
    """Polished marble: soft veins bent by fractal noise, faint hairline veins, cloudy base."""
    xx, yy = grid(S)
    t = _fbm(rng, S, 2, 5)
    ang = np.deg2rad(30 + rng.uniform(-8, 8))
    s = (xx * np.cos(ang) + yy * np.sin(ang)) / S
    v = np.sin(2 * np.pi * (2.0 * s + rng.uniform(0, 1)) + 2.5 * t)
    vein = (1 - np.abs(v)) ** 6
    hair = np.clip(1 - np.abs(_fbm(rng, S, 4, 4)) / 0.06, 0, 1) ** 2
    cloud = smooth_noise(rng, S, 4)
    base = np.array([204, 214, 224], np.float32) + rng.uniform(-5, 5, 3).astype(np.float32)
    vein_col = np.array([140, 145, 152], np.float32)
    vmix = np.clip(0.6 * vein + 0.2 * hair, 0, 1)[..., None]
    img = base * (1 + 0.03 * cloud[..., None]) * (1 - vmix) + vein_col * vmix
    grain = cv2.GaussianBlur(rng.standard_normal((S, S)).astype(np.float32), (0, 0), 0.8)
    img += (5 * grain / (grain.std() + 1e-6))[..., None]
    img *= _lighting(rng, S, 0.03)
    return Scene(img, None, np.ones((S, S), bool), TEXTURE)


RENDERERS = {"disc": _render_disc, "bracket": _render_bracket,
              "weave": _render_weave, "marble": _render_marble}
