"""DRAEM-style pseudo anomalies: a Perlin-noise mask filled with an (augmented) outlier texture.

DMAD's abnormal memory bank and its score head both need anomalous patches before any real
anomaly is seen; DRAEM's recipe makes them from normal images:

* mask: 2-D Perlin noise with ``2**randint(*perlin_scale)`` lattice cells per axis (default
  scales 1..32), rotated by a random angle in +-``rotate`` degrees, thresholded at ``threshold``
  (0.5). Our addition: a mask whose coverage falls outside ``coverage`` = (min, max) has its
  threshold moved to the noise quantile that gives the nearest bound, so every pseudo anomaly
  is visible at patch level and never swallows the whole object.
* texture: an image from ``texture_dir`` (DTD or any folder, searched recursively), another
  training image (``self``) or a procedural one (``procedural``: value noise, gratings and
  cells in random colours; used when no folder is given); 3 of DRAEM's 10 augmentations
  (gamma, brightness, sharpness, hue/saturation, solarize, posterize, invert, autocontrast,
  equalize, rotation) are applied to it.
* blend: ``out = (1 - m) x + m (beta t + (1 - beta) x)``, ``beta ~ U(beta_range)``, default
  [0.2, 1.0]: the texture's weight (DRAEM's ``1 - beta`` with its beta in [0, 0.8]).

Everything random comes from a ``numpy.random.Generator`` derived from (seed, epoch, index,
stream) by :func:`sample_rng`, so a sample is the same in every run, worker layout or resume.

The Dataset wrappers that apply it to a training set live in ``datasets/pseudo_anomaly.py``.
"""
import os
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from dualmem.utils.errors import UserError

TEXTURE_SOURCES = ("folder", "procedural", "self")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".tga", ".ppm")

# streams keep the training samples, the abnormal-bank samples and the pool draws independent
STREAM_TRAIN, STREAM_BANK, STREAM_POOL, STREAM_VARIANT = 0, 1, 2, 3


def sample_rng(seed, epoch, index, stream=STREAM_TRAIN):
    """The generator of one pseudo anomaly; independent for every (seed, epoch, index, stream)."""
    return np.random.default_rng(np.random.SeedSequence(
        [int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(stream)]))


# ----------------------------------------------------------------------------- Perlin masks
def _fade(t):
    return ((6.0 * t - 15.0) * t + 10.0) * t ** 3


def perlin_noise(shape, res, rng):
    """2-D gradient (Perlin) noise of ``shape`` (H, W) with ``res`` (ry, rx) lattice cells,
    scaled by sqrt(2) as DRAEM does (values in about [-1, 1]). Vectorised over pixels."""
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(res[0]), int(res[1])
    angles = 2.0 * np.pi * rng.random((ry + 1, rx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    y = np.arange(h) * (ry / h)
    x = np.arange(w) * (rx / w)
    yi, xi = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]
    yi, xi = yi[:, None], xi[None, :]

    def corner(oy, ox):
        return gy[yi + oy, xi + ox] * (yf - oy) + gx[yi + oy, xi + ox] * (xf - ox)

    u, v = _fade(yf), _fade(xf)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return (np.sqrt(2.0) * (top * (1 - u) + bottom * u)).astype(np.float32)


def _rotate(img, angle, border=cv2.BORDER_REFLECT_101):
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), float(angle), 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=border)


def perlin_mask(rng, shape, perlin_scale=(0, 6), threshold=0.5, rotate=90.0,
                coverage=(0.01, 0.5)):
    """Binary float32 (H, W) mask; scales ``2**randint(lo, hi)`` per axis (hi exclusive)."""
    lo, hi = int(perlin_scale[0]), int(perlin_scale[1])
    sy, sx = 2 ** int(rng.integers(lo, hi)), 2 ** int(rng.integers(lo, hi))
    noise = perlin_noise(shape, (sy, sx), rng)
    if rotate:
        noise = _rotate(noise, rng.uniform(-rotate, rotate))
    mask = noise > threshold
    if coverage is not None:
        cmin, cmax = float(coverage[0]), float(coverage[1])
        frac = mask.mean()
        if frac < cmin or frac > cmax:
            target = cmin if frac < cmin else cmax
            mask = noise > np.quantile(noise, 1.0 - target)
    return mask.astype(np.float32)


# ----------------------------------------------------------------------------- textures
def _value_noise(rng, h, w, cells):
    small = rng.random((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def procedural_texture(rng, h, w):
    """An HxWx3 uint8 outlier texture: fractal noise, a grating or cells, in random colours."""
    kind = int(rng.integers(3))
    if kind == 0:  # fractal value noise
        base = np.zeros((h, w), np.float32)
        amp = 1.0
        for octave in range(4):
            base += amp * _value_noise(rng, h, w, int(rng.integers(2, 6)) * 2 ** octave)
            amp *= 0.5
    elif kind == 1:  # oriented grating, warped by noise
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        freq = rng.uniform(2, 24) * 2 * np.pi / max(h, w)
        warp = 6.0 * _value_noise(rng, h, w, int(rng.integers(2, 8)))
        base = np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) + warp)
    else:  # random cells (blocky mosaic)
        cells = int(rng.integers(4, 32))
        small = rng.random((cells, cells)).astype(np.float32)
        base = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    base = (base - base.min()) / max(float(base.max() - base.min()), 1e-6)
    c0, c1 = rng.random(3), rng.random(3)
    tex = c0[None, None, :] * (1 - base[..., None]) + c1[None, None, :] * base[..., None]
    tex += rng.normal(0, 0.03, tex.shape)
    return (np.clip(tex, 0, 1) * 255).astype(np.uint8)


def list_textures(texture_dir):
    root = Path(os.path.expanduser(str(texture_dir)))
    if not root.is_dir():
        raise FileNotFoundError(f"pseudo_anomaly.texture_dir: folder not found: {root}")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                   and p.is_file())
    if not files:
        raise UserError(f"pseudo_anomaly.texture_dir: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                         f"under {root}")
    return files


@lru_cache(maxsize=64)
def load_texture(path, h, w):
    from PIL import Image  # Pillow reads TGA (game texture packs), OpenCV does not

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise UserError(f"pseudo_anomaly: cannot read texture {path} "
                         f"({type(exc).__name__}: {exc})") from None
    arr = cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA if arr.shape[0] > h
                     else cv2.INTER_LINEAR)
    arr.setflags(write=False)
    return arr


# DRAEM's ten texture augmentations (imgaug in the reference; NumPy/OpenCV here)
def _gamma(rng, x):
    return np.clip(255.0 * (x / 255.0) ** rng.uniform(0.5, 2.0), 0, 255)


def _brightness(rng, x):
    return np.clip(x * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30), 0, 255)


def _sharpness(rng, x):
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0  # PIL SMOOTH
    blurred = cv2.filter2D(x.astype(np.float32), -1, kernel)
    return np.clip(blurred + rng.uniform(0.0, 2.0) * (x - blurred), 0, 255)


def _hue_saturation(rng, x):
    hsv = cv2.cvtColor(x.astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-50, 50) * 180.0 / 255.0) % 180.0
    hsv[..., 1] = np.clip(hsv[..., 1] + rng.uniform(-50, 50), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)


def _solarize(rng, x):
    t = rng.uniform(32, 128)
    return np.where(x >= t, 255.0 - x, x)


def _posterize(rng, x):
    bits = int(rng.integers(2, 7))
    step = 2 ** (8 - bits)
    return np.floor(x / step) * step


def _invert(rng, x):
    return 255.0 - x


def _autocontrast(rng, x):
    lo = x.reshape(-1, 3).min(0)
    hi = x.reshape(-1, 3).max(0)
    return (x - lo) * (255.0 / np.maximum(hi - lo, 1.0))


def _equalize(rng, x):
    u8 = x.astype(np.uint8)
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(u8[..., c])) for c in range(3)],
                    axis=-1).astype(np.float32)


def _affine(rng, x):
    return _rotate(x.astype(np.float32), rng.uniform(-45, 45))


TEXTURE_AUGMENTATIONS = (_gamma, _brightness, _sharpness, _hue_saturation, _solarize,
                         _posterize, _invert, _autocontrast, _equalize, _affine)


def augment_texture(rng, tex, n=3):
    """``n`` distinct augmentations drawn from DRAEM's ten, in random order."""
    x = tex.astype(np.float32)
    for i in rng.choice(len(TEXTURE_AUGMENTATIONS), size=min(n, len(TEXTURE_AUGMENTATIONS)),
                        replace=False):
        x = np.clip(TEXTURE_AUGMENTATIONS[int(i)](rng, x), 0, 255)
    return x


class PseudoAnomalySynthesizer:
    """The recipe (mask + texture + blend) shared by training data and DMAD's abnormal bank.

    ``self_images``: for ``texture_source: self``, a pair (count, load(i) -> HxWx3 uint8 RGB)
    of the images textures are taken from (the training set).
    """

    def __init__(self, texture_source=None, texture_dir=None, beta=(0.2, 1.0),
                 perlin_scale=(0, 6), threshold=0.5, rotate=90.0, coverage=(0.01, 0.5),
                 texture_augmentations=3, self_images=None):
        if texture_source is None:
            texture_source = "folder" if texture_dir else "procedural"
        if texture_source not in TEXTURE_SOURCES:
            raise UserError(f"pseudo_anomaly.texture_source must be one of {TEXTURE_SOURCES}, "
                             f"got '{texture_source}'")
        if texture_source == "folder" and not texture_dir:
            raise UserError("pseudo_anomaly.texture_source is 'folder' but texture_dir is not "
                             "set (or use texture_source: procedural | self)")
        if texture_source == "self" and self_images is None:
            raise UserError("pseudo_anomaly.texture_source 'self' needs the training images")
        beta = tuple(float(b) for b in beta)
        if not (len(beta) == 2 and 0.0 <= beta[0] <= beta[1] <= 1.0):
            raise UserError(f"pseudo_anomaly.beta must be [lo, hi] within [0, 1], got {beta}")
        perlin_scale = tuple(int(s) for s in perlin_scale)
        if not (len(perlin_scale) == 2 and 0 <= perlin_scale[0] < perlin_scale[1]):
            raise UserError(f"pseudo_anomaly.perlin_scale must be [lo, hi) with 0 <= lo < hi, "
                             f"got {list(perlin_scale)}")
        if coverage is not None:
            coverage = tuple(float(c) for c in coverage)
            if not (len(coverage) == 2 and 0.0 < coverage[0] <= coverage[1] <= 1.0):
                raise UserError(f"pseudo_anomaly.coverage must be [min, max] within (0, 1], "
                                 f"got {list(coverage)}")
        self.texture_source = texture_source
        self.texture_dir = texture_dir
        self.textures = list_textures(texture_dir) if texture_source == "folder" else None
        self.beta = beta
        self.perlin_scale = perlin_scale
        self.threshold = float(threshold)
        self.rotate = float(rotate)
        self.coverage = coverage
        self.texture_augmentations = int(texture_augmentations)
        self.self_images = self_images

    def mask(self, rng, h, w):
        return perlin_mask(rng, (h, w), self.perlin_scale, self.threshold, self.rotate,
                           self.coverage)

    def texture(self, rng, h, w, index=None):
        if self.texture_source == "folder":
            tex = load_texture(self.textures[int(rng.integers(len(self.textures)))], h, w)
        elif self.texture_source == "self":
            count, load = self.self_images
            j = int(rng.integers(count))
            if index is not None and count > 1 and j == index:
                j = (j + 1) % count
            tex = load(j)
            if tex.shape[:2] != (h, w):
                tex = cv2.resize(tex, (w, h), interpolation=cv2.INTER_LINEAR)
        else:
            tex = procedural_texture(rng, h, w)
        return augment_texture(rng, tex, self.texture_augmentations) / 255.0

    def __call__(self, rng, image, index=None):
        """``image`` HxWx3 float in [0, 1] -> (blended image, float32 mask HxW)."""
        h, w = image.shape[:2]
        mask = self.mask(rng, h, w)
        tex = self.texture(rng, h, w, index)
        beta = rng.uniform(*self.beta)
        m = mask[..., None]
        out = image * (1.0 - m) + m * (beta * tex + (1.0 - beta) * image)
        return out.astype(np.float32), mask


def recipe_kwargs(cfg):
    """The synthesizer's kwargs from a ``pseudo_anomaly`` config mapping (other keys dropped)."""
    keys = ("texture_source", "texture_dir", "beta", "perlin_scale", "threshold", "rotate",
            "coverage", "texture_augmentations")
    return {k: cfg[k] for k in keys if k in (cfg or {})}


def self_image_loader(dataset):
    """(count, load) over the normal images of a ManifestDataset, for ``texture_source: self``."""
    from dualmem.datasets.image_io import LEGACY_RESIZE, read_image, resize_image

    records = [r for r in dataset.records if int(r["label"]) == 0]
    size = tuple(dataset.input_size)
    method = getattr(dataset, "resize", LEGACY_RESIZE)  # as the dataset resizes its images

    def load(i):
        img = read_image(dataset.path_of(records[i]["filename"]), "RGB")
        return resize_image(img, size, method)

    return len(records), load
