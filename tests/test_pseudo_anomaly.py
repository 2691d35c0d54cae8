"""Pseudo anomalies (DRAEM recipe): Perlin noise against a loop reference, masks deterministic
and within the coverage range, the blend formula, the dataset wrapper and its config wiring."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dualmem.datasets.pseudo_anomaly import PseudoAnomalyDataset, wrap_pseudo_anomalies
from dualmem.datasets.pseudo_anomaly_synthesis import (PseudoAnomalySynthesizer, list_textures,
                                               perlin_mask, perlin_noise, sample_rng)


def _perlin_loop(shape, res, angles):
    """Textbook Perlin noise, one pixel at a time, from given lattice gradient angles."""
    h, w = shape
    ry, rx = res
    out = np.zeros(shape)
    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3  # noqa: E731
    for i in range(h):
        for j in range(w):
            y, x = i * ry / h, j * rx / w
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            fy, fx = y - y0, x - x0

            def dot(cy, cx):
                a = angles[y0 + cy, x0 + cx]
                return np.sin(a) * (fy - cy) + np.cos(a) * (fx - cx)

            top = dot(0, 0) + fade(fx) * (dot(0, 1) - dot(0, 0))
            bottom = dot(1, 0) + fade(fx) * (dot(1, 1) - dot(1, 0))
            out[i, j] = np.sqrt(2) * (top + fade(fy) * (bottom - top))
    return out


@pytest.mark.parametrize("shape,res", [((16, 24), (2, 3)), ((20, 20), (4, 1)), ((8, 8), (1, 1))])
def test_perlin_noise_matches_loop_reference(shape, res):
    angles = 2 * np.pi * np.random.default_rng(3).random((res[0] + 1, res[1] + 1))
    got = perlin_noise(shape, res, np.random.default_rng(3))
    np.testing.assert_allclose(got, _perlin_loop(shape, res, angles), atol=1e-5)
    assert np.abs(got).max() <= 1.0 + 1e-5


def test_perlin_mask_deterministic_binary_and_within_coverage():
    masks = [perlin_mask(sample_rng(7, 0, i), (64, 64), coverage=(0.02, 0.4)) for i in range(40)]
    again = [perlin_mask(sample_rng(7, 0, i), (64, 64), coverage=(0.02, 0.4)) for i in range(40)]
    for a, b in zip(masks, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(masks[0], masks[1])
    other_epoch = perlin_mask(sample_rng(7, 1, 0), (64, 64), coverage=(0.02, 0.4))
    assert not np.array_equal(masks[0], other_epoch)
    cov = np.array([m.mean() for m in masks])
    for m in masks:
        assert set(np.unique(m)) <= {0.0, 1.0}
    # a 1-pixel tolerance for quantile ties
    assert cov.min() >= 0.02 - 1 / 4096 and cov.max() <= 0.4 + 1 / 4096
    assert cov.std() > 0.01  # varied, not all pinned at a bound


def test_perlin_mask_without_coverage_is_plain_threshold():
    rng_a, rng_b = sample_rng(1, 0, 5), sample_rng(1, 0, 5)
    m = perlin_mask(rng_a, (32, 32), perlin_scale=(1, 2), rotate=0, coverage=None)
    sy, sx = 2 ** int(rng_b.integers(1, 2)), 2 ** int(rng_b.integers(1, 2))
    noise = perlin_noise((32, 32), (sy, sx), rng_b)
    np.testing.assert_array_equal(m, (noise > 0.5).astype(np.float32))


def test_blend_formula_and_beta_range():
    synth = PseudoAnomalySynthesizer("procedural", beta=(0.2, 1.0))
    synth.texture = lambda rng, h, w, index=None: np.full((h, w, 3), 0.9)
    image = np.full((48, 48, 3), 0.1, np.float32)
    betas = []
    for i in range(20):
        out, mask = synth(sample_rng(0, 0, i), image)
        inside = mask > 0
        assert inside.any()
        np.testing.assert_array_equal(out[~inside], image[~inside])
        beta = (out[inside] - 0.1) / 0.8
        assert np.ptp(beta) < 1e-5  # one beta per anomaly
        betas.append(float(beta.mean()))
    assert min(betas) >= 0.2 - 1e-6 and max(betas) <= 1.0 + 1e-6
    assert max(betas) - min(betas) > 0.2


def test_textures_from_folder_recursive(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/t1.png", "a/b/t2.jpg", "t3.bmp"):
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    files = list_textures(tmp_path)
    assert [str(Path(f).relative_to(tmp_path)) for f in files] == ["a/b/t2.jpg", "a/t1.png",
                                                                   "t3.bmp"]
    synth = PseudoAnomalySynthesizer(texture_dir=str(tmp_path))
    assert synth.texture_source == "folder"
    tex = synth.texture(sample_rng(0, 0, 0), 32, 40)
    assert tex.shape == (32, 40, 3) and 0 <= tex.min() and tex.max() <= 1
    with pytest.raises(FileNotFoundError, match="texture_dir"):
        PseudoAnomalySynthesizer("folder", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="texture_source"):
        PseudoAnomalySynthesizer("dtd")


class _FakeBase:
    """ManifestDataset-like: normalised images, masks, labels; index 0 is a real anomaly."""

    pixel_mean, pixel_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __init__(self, n=12, size=32):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.records = [{"filename": f"{i}.png", "label": int(i == 0), "clsname": "c"}
                        for i in range(n)]
        self.input_size = (size, size)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        label = self.records[i]["label"]
        return {"image": (self.images[i] - 0.5) / 0.25,
                "mask": torch.full((1,) + self.input_size, float(label)),
                "label": label, "clsname": "c", "filename": f"{i}.png", "index": i}


def test_dataset_wrapper_deterministic_by_seed_epoch_index():
    base = _FakeBase()
    a = PseudoAnomalyDataset(base, prob=1.0, seed=3)
    b = PseudoAnomalyDataset(base, prob=1.0, seed=3)
    assert a.deterministic is False and len(a) == len(base)
    for i in range(1, 5):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert x["label"] == 1 and x["mask"].sum() > 0
        # outside the mask the image is the base image (up to the float round trip)
        outside = x["mask"][0] == 0
        assert torch.allclose(x["image"][:, outside], base[i]["image"][:, outside], atol=1e-5)
        assert set(x) == set(base[i])
    first = a[1]["mask"].clone()
    a.set_epoch(1)
    assert not torch.equal(a[1]["mask"], first)
    a.epoch_source = type("Sampler", (), {"epoch": 0})()
    assert torch.equal(a[1]["mask"], first)  # the linked sampler's epoch wins
    # a real anomaly passes through untouched
    assert torch.equal(a[0]["image"], base[0]["image"])


def test_dataset_wrapper_probability_and_forwarding():
    base = _FakeBase(n=200, size=8)
    ds = PseudoAnomalyDataset(base, prob=0.3, seed=0, coverage=(0.05, 0.5))
    labels = [ds[i]["label"] for i in range(1, 200)]
    assert 0.2 < np.mean(labels) < 0.4
    assert ds.records is base.records and ds.input_size == base.input_size
    ds.records = base.records[:10]  # the Trainer's validation reassigns records
    assert len(base.records) == 10
    assert wrap_pseudo_anomalies(base, None) is base
    assert wrap_pseudo_anomalies(base, {"prob": 0.0}) is base
    with pytest.raises(ValueError, match="unknown key"):
        wrap_pseudo_anomalies(base, {"prob": 0.5, "texure_dir": "x"})


def test_builder_wires_pseudo_anomalies(tmp_path):
    from dualmem.datasets.builder import build_datasets
    from dualmem.datasets.manifest import write_manifest
    from dualmem.utils.config import load_config

    rng = np.random.default_rng(0)
    recs = {"train": [], "test": []}
    for split, n in (("train", 4), ("test", 3)):
        for i in range(n):
            name = f"c/{split}/{i}.png"
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / name), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            recs[split].append({"filename": name, "label": 0, "clsname": "c"})
        write_manifest(tmp_path / f"{split}.json", recs[split])
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        "dataset:\n  image_reader: {type: opencv, kwargs: {image_dir: .}}\n"
        "  train: {meta_file: train.json, pseudo_anomaly: {prob: 1.0, seed: 4, "
        "texture_source: self}}\n  test: {meta_file: test.json}\n  input_size: [16, 16]\n"
        "net: []\n")
    cfg = load_config(cfg_file)
    train, test, classes = build_datasets(cfg, (0.5,) * 3, (0.5,) * 3)
    assert isinstance(train, PseudoAnomalyDataset) and train.seed == 4
    assert train.synth.texture_source == "self"
    assert train[0]["label"] == 1 and len(test) == 3 and classes == ["c"]


def test_pool_is_a_fixed_set_of_versions_chosen_per_epoch():
    """With ``pool: P`` every epoch shows each image as itself or one of P fixed variants; the
    pool dataset holds exactly those versions, at ``index * (P + 1) + v``."""
    base = _FakeBase(n=60)
    ds = PseudoAnomalyDataset(base, prob=0.5, seed=1, pool=2, coverage=(0.05, 0.5))
    pool = ds.pool_dataset()
    assert pool.deterministic is True and len(pool) == 3 * len(base)
    seen = {}
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(1, 60):
            v = ds.variant_of(epoch, i)
            seen.setdefault(i, set()).add(v)
            item, stored = ds[i], pool[ds.pool_position(epoch, i)]
            assert stored["index"] == i and stored["cache_index"] == i * 3 + v
            assert torch.equal(item["image"], stored["image"])
            assert torch.equal(item["mask"], stored["mask"])
            assert item["label"] <= int(v > 0)  # a variant's mask can be empty
    shown = [v for vs in seen.values() for v in vs]
    assert set(shown) == {0, 1, 2}  # both variants and the image itself occur
    # the two variants of one image differ, and version 0 is the image itself
    assert not torch.equal(pool[4]["mask"], pool[5]["mask"])
    assert torch.equal(pool[3]["image"], base[1]["image"])
    # share of pseudo anomalies follows prob
    share = np.mean([ds.variant_of(0, i) > 0 for i in range(1, 60)])
    assert 0.3 < share < 0.7
    # a labelled anomaly is never changed
    assert all(torch.equal(pool[v]["image"], base[0]["image"]) for v in range(3))
    # the on-disk cache key sees the recipe
    assert pool.cache_identity()["pseudo_anomaly"]["pool"] == 2
    assert PseudoAnomalyDataset(base, prob=0.5).pool_dataset() is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="pool must be null"):
            wrap_pseudo_anomalies(base, {"prob": 0.5, "pool": bad})
