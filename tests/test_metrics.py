"""utils.metrics against independent references (sklearn, brute-force sweeps, torch pooling)."""
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from dualmem.utils import metrics as M
from dualmem.utils import ranking_curve as RC

try:
    import torch
except Exception:  # torch may still be installing; numpy sliding windows are the fallback
    torch = None


# ----------------------------------------------------------------------------- references

def ref_f1max(scores, labels):
    """Brute force: every distinct score as threshold (score >= t), plus 'nothing positive'."""
    s, y = np.ravel(scores).astype(np.float64), np.ravel(labels) > 0.5
    best, best_t = 0.0, math.inf
    for t in np.unique(s)[::-1]:
        pred = s >= t
        tp = np.sum(pred & y)
        p = tp / pred.sum()
        r = tp / y.sum()
        f1 = 0.0 if p + r == 0 else 2 * p * r / (p + r)
        if f1 > best:
            best, best_t = f1, t
    return best, best_t


def ref_aupro(maps, masks, limit=0.3):
    """Brute force MVTec AUPRO: threshold sweep, scipy label per image, interpolate at ``limit``."""
    maps = np.asarray(maps, dtype=np.float64)
    gt = np.asarray(masks) > 0.5
    regions = []
    for i in range(len(gt)):
        lab, n = ndimage.label(gt[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    neg = ~gt
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        xs.append(np.sum(pred & neg) / neg.sum())
        ys.append(np.mean([pred[i][r].mean() for i, r in regions]))
    xs, ys = np.array(xs), np.array(ys)
    area, k = 0.0, 1
    while k < len(xs) and xs[k] <= limit:
        area += (xs[k] - xs[k - 1]) * (ys[k] + ys[k - 1]) / 2
        k += 1
    if k < len(xs):
        y_lim = np.interp(limit, [xs[k - 1], xs[k]], [ys[k - 1], ys[k]])
        area += (limit - xs[k - 1]) * (y_lim + ys[k - 1]) / 2
    return area / limit


def ref_max_pool_score(maps, k):
    if torch is not None:
        t = torch.from_numpy(np.asarray(maps, dtype=np.float32))[:, None]
        return torch.nn.functional.avg_pool2d(t, k, stride=1).amax(dim=(1, 2, 3)).double().numpy()
    win = np.lib.stride_tricks.sliding_window_view(np.asarray(maps, np.float64), (k, k), axis=(1, 2))
    return win.mean(axis=(-1, -2)).max(axis=(1, 2))


def blob_data(rng, n=6, h=24, w=24, dtype=np.float32, quant=None):
    """Maps with several blob anomalies (some diagonal-touching) and noisy, partly tied scores."""
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(1, n):  # image 0 stays normal
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(2, h - 2), rng.integers(2, w - 2), rng.integers(1, 4)
            yy, xx = np.ogrid[:h, :w]
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    masks[-1, 0, 0] = masks[-1, 1, 1] = 1  # diagonal neighbours: one region under 8-connectivity
    maps = rng.normal(0, 1, (n, h, w)) + 1.5 * masks * rng.random((n, h, w))
    if quant:
        maps = np.round(maps * quant) / quant
    return maps.astype(dtype), masks


# ----------------------------------------------------------------------------- curve metrics vs sklearn

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quant", [None, 4])
def test_image_metrics_match_sklearn(seed, quant):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    y = rng.random(n) < 0.4
    y[:2] = [True, False]
    s = rng.normal(size=n) + y
    if quant:
        s = np.round(s * quant) / quant  # many ties
    assert M.image_auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.image_ap(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.image_f1max(s, y) == pytest.approx(ref_f1max(s, y)[0], abs=1e-12)
    assert M.f1_optimal_threshold(s, y) == pytest.approx(ref_f1max(s, y)[1])


@pytest.mark.parametrize("method", ["sort", "hist"])
@pytest.mark.parametrize("quant", [None, 8])
def test_pixel_metrics_match_sklearn(method, quant):
    rng = np.random.default_rng(7)
    maps, masks = blob_data(rng, n=8, h=32, w=32, dtype=np.float16, quant=quant)
    pos, neg = np.flatnonzero(masks), np.flatnonzero(masks == 0)
    maps.flat[pos[:3]], maps.flat[neg[:3]] = -0.0, 0.0  # signed zeros must form one tie group
    c = M._build_curve(maps, masks, method=method)
    y, s = masks.ravel() > 0.5, maps.ravel().astype(np.float64)
    assert c.auroc() == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert c.ap() == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert c.f1max() == pytest.approx(ref_f1max(s, y)[0], abs=1e-12)


def test_hist_and_sort_paths_agree_float16():
    rng = np.random.default_rng(3)
    maps, masks = blob_data(rng, n=10, h=40, w=40, dtype=np.float16, quant=16)
    a = M._build_curve(maps, masks, regions=True, method="hist")
    b = M._build_curve(maps, masks, regions=True, method="sort")
    for f in ("auroc", "ap", "f1max", "aupro", "f1_threshold"):
        assert getattr(a, f)() == pytest.approx(getattr(b, f)(), abs=1e-12)
    with pytest.raises(ValueError):
        M._build_curve(maps.astype(np.float32), masks, method="hist")


def test_float_dtypes_and_mask_types_equivalent():
    rng = np.random.default_rng(11)
    maps, masks = blob_data(rng, dtype=np.float16)
    ref = M.compute_class_metrics(None, None, maps, masks)
    for mp, mk in [(maps.astype(np.float32), masks.astype(bool)),
                   (maps.astype(np.float64), masks.astype(np.float32) * 0.9),
                   (maps, masks * 255)]:
        got = M.compute_class_metrics(None, None, mp, mk)
        for k in M.PIXEL_METRICS:
            assert got[k] == pytest.approx(ref[k], abs=1e-12)


def test_nan_raises():
    maps = np.zeros((1, 300, 300), np.float16)
    masks = np.zeros_like(maps, dtype=np.uint8)
    masks[0, :5] = 1
    maps[0, 100, 100] = np.nan
    with pytest.raises(ValueError):
        M.pixel_auroc(maps, masks)  # histogram path
    with pytest.raises(ValueError):
        M.pixel_auroc(maps.astype(np.float32), masks)  # sort path


# ----------------------------------------------------------------------------- AUPRO

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype,quant", [(np.float32, None), (np.float16, 4), (np.float64, 2)])
def test_aupro_matches_bruteforce(seed, dtype, quant):
    rng = np.random.default_rng(100 + seed)
    maps, masks = blob_data(rng, dtype=dtype, quant=quant)
    got = M.pixel_aupro(maps, masks)
    assert got == pytest.approx(ref_aupro(maps, masks), abs=1e-3)
    assert 0.0 <= got <= 1.0


def test_aupro_other_limit_and_hist_path():
    rng = np.random.default_rng(5)
    maps, masks = blob_data(rng, n=6, h=120, w=120, dtype=np.float16, quant=8)  # >= 65536 px: hist
    for lim in (0.3, 0.05, 1.0):
        assert M.pixel_aupro(maps, masks, fpr_limit=lim) == pytest.approx(
            ref_aupro(maps, masks, lim), abs=1e-3)


def test_aupro_perfect_and_bounded():
    rng = np.random.default_rng(1)
    _, masks = blob_data(rng)
    perfect = masks.astype(np.float32) + 0.01 * rng.random(masks.shape)
    for dt in (np.float16, np.float32):
        assert M.pixel_aupro(perfect.astype(dt), masks) == pytest.approx(1.0, abs=1e-6)
        assert M.pixel_aupro(perfect.astype(dt), masks) <= 1.0
    binary = masks.astype(np.float16)  # perfect with ties only
    assert M.pixel_aupro(binary, masks) == pytest.approx(1.0, abs=1e-6)
    inverted = -perfect
    assert M.pixel_aupro(inverted, masks) == pytest.approx(0.0, abs=1e-6)
    for seed in range(5):
        maps, m = blob_data(np.random.default_rng(seed), quant=2)
        assert M.pixel_aupro(maps, m) <= 1.0


def test_aupro_region_weighting_and_8_connectivity():
    # one image: a 1-px region and a 3-px diagonal chain (one region under 8-connectivity)
    masks = np.zeros((1, 6, 6), np.uint8)
    masks[0, 0, 0] = 1
    masks[0, 3, 3] = masks[0, 4, 4] = masks[0, 5, 5] = 1  # diagonal chain -> one region
    maps = np.zeros((1, 6, 6), np.float32)
    maps[0, 0, 0] = 1.0  # small region fully found ...
    maps[0, 3, 3] = maps[0, 4, 4] = maps[0, 5, 5] = -1.0  # ... big one ranked below all normals
    # PRO jumps to 0.5 at FPR 0 and stays flat until FPR 1, so the normalised area is 0.5
    assert M.pixel_aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    maps[0, 3, 3] = 2.0  # one third of the big region above everything: PRO = (1 + 1/3) / 2
    assert M.pixel_aupro(maps, masks) == pytest.approx(2 / 3, abs=1e-12)
    # (4-connectivity would give 4 regions and PRO = (1 + 1) / 4 = 0.5 here)
    lab, n = RC._label_regions(masks[0])
    assert n == 2


def test_scipy_labelling_fallback_equal(monkeypatch):
    rng = np.random.default_rng(9)
    maps, masks = blob_data(rng, quant=4)
    for m in masks:  # default (cv2) labelling vs scipy
        assert RC._label_regions(m)[1] == ndimage.label(m, structure=np.ones((3, 3)))[1]
    ref = M.pixel_aupro(maps, masks)
    monkeypatch.setattr(RC, "_cv2", None)
    assert M.pixel_aupro(maps, masks) == pytest.approx(ref, abs=1e-12)


# ----------------------------------------------------------------------------- policy

def test_one_class_gives_none():
    s = np.array([0.1, 0.5, 0.9])
    for y in (np.zeros(3), np.ones(3)):
        assert M.image_auroc(s, y) is None
        assert M.image_ap(s, y) is None
        assert M.image_f1max(s, y) is None
        assert M.f1_optimal_threshold(s, y) is None
    maps = np.random.default_rng(0).random((3, 16, 16)).astype(np.float16)
    out = M.compute_class_metrics(s, np.zeros(3), maps, np.zeros((3, 16, 16), np.uint8))
    assert all(v is None for v in out.values())
    out = M.compute_class_metrics(s, np.ones(3), maps, np.ones((3, 16, 16), bool))
    assert all(v is None for v in out.values())
    out = M.compute_class_metrics(s[:0], s[:0], maps[:0], maps[:0])  # empty class
    assert all(v is None for v in out.values())


def test_auroc_below_half_not_flipped():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.5
    s = -y.astype(float) + 0.5 * rng.normal(size=300)
    a = M.image_auroc(s, y)
    assert a < 0.5 and a == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    maps, masks = blob_data(rng)
    assert M.pixel_auroc(-maps, masks) < 0.5


def test_compute_class_metrics_options():
    rng = np.random.default_rng(2)
    maps, masks = blob_data(rng, dtype=np.float16)
    y = masks.reshape(len(masks), -1).any(1)
    s = M.image_score_from_map(maps, "max", kernel=4)
    out = M.compute_class_metrics(s, y, maps, masks)
    assert list(out) == M.METRIC_NAMES and all(v is not None for v in out.values())
    assert out["pixel_aupro"] == pytest.approx(M.pixel_aupro(maps, masks), abs=1e-12)
    no_px = M.compute_class_metrics(s, y)
    assert [no_px[k] for k in M.PIXEL_METRICS] == [None] * 4
    assert no_px["image_auroc"] == out["image_auroc"]
    sub = M.compute_class_metrics(s, y, maps, masks, metrics=["pixel_ap"])
    assert list(sub) == ["pixel_ap"] and sub["pixel_ap"] == out["pixel_ap"]
    ch = M.compute_class_metrics(s, y, maps[:, None], masks[:, None])  # N x 1 x H x W accepted
    assert ch == out
    with pytest.raises(ValueError):
        M.compute_class_metrics(s, y, metrics=["bogus"])
    with pytest.raises(ValueError):
        M.compute_class_metrics(s, y, maps, masks[:-1])
    if torch is not None:
        t = M.compute_class_metrics(torch.from_numpy(s), torch.from_numpy(y),
                                    torch.from_numpy(maps), torch.from_numpy(masks))
        assert t == out


def test_summarize():
    a = {k: 0.5 for k in M.METRIC_NAMES}
    b = {k: 1.0 for k in M.METRIC_NAMES}
    b["pixel_aupro"] = None
    s = M.summarize({"a": a, "b": b})
    assert s["image_auroc"] == pytest.approx(0.75)
    assert s["pixel_aupro"] == pytest.approx(0.5)  # None ignored
    assert s["mad"] == pytest.approx((6 * 0.75 + 0.5) / 7)
    a["note"], b["thr"] = "text", 2.0  # non-numeric extras skipped, numeric extras averaged
    assert "note" not in M.summarize({"a": a, "b": b})
    assert M.summarize({"a": a, "b": b})["thr"] == 2.0
    a2 = dict(a, pixel_aupro=None)
    s2 = M.summarize({"a": a2, "b": b})
    assert s2["pixel_aupro"] is None and s2["mad"] is None


# ----------------------------------------------------------------------------- image_score_from_map

@pytest.mark.parametrize("use_cv2", [True, False])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_image_score_max_matches_avg_pool(k, use_cv2, monkeypatch):
    if not use_cv2:
        monkeypatch.setattr(M, "_cv2", None)  # numpy integral-image fallback
    rng = np.random.default_rng(k)
    maps = rng.random((5, 37, 29)).astype(np.float16)
    maps[2, 30:, 20:] += 3  # maximum in the bottom-right corner: checks the valid-window crop
    got = M.image_score_from_map(maps, "max", kernel=k)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, ref_max_pool_score(maps, k), rtol=0, atol=1e-5)


def test_image_score_other_reductions():
    rng = np.random.default_rng(0)
    maps = rng.random((4, 20, 20)).astype(np.float32)
    flat = maps.reshape(4, -1).astype(np.float64)
    np.testing.assert_allclose(M.image_score_from_map(maps, "mean"), flat.mean(1), atol=1e-12)
    np.testing.assert_allclose(M.image_score_from_map(maps, "std"), flat.std(1), atol=1e-12)
    top = np.sort(flat, 1)[:, -4:].mean(1)  # ceil(0.01 * 400) = 4
    np.testing.assert_allclose(M.image_score_from_map(maps, "topk", topk=0.01), top, atol=1e-12)
    np.testing.assert_allclose(M.image_score_from_map(maps, "max", kernel=100),
                               flat.mean(1), atol=1e-12)  # kernel clamped to the map size
    assert M.image_score_from_map(maps[0], "mean").shape == ()
    with pytest.raises(ValueError):
        M.image_score_from_map(maps, "median")


def test_evaluation_keeps_maps_in_float32():
    """Close scores stay apart (float16 storage merged 1.0 and 1.0001 into a tie, which moved
    pixel AP): the maps metrics see are the model's float32 maps (#25 item 14)."""
    import torch

    from dualmem.utils.evaluator import run_inference

    pred = torch.ones(2, 1, 4, 4)
    pred[1, 0, 0, 0] = 1.0001

    class Net(torch.nn.Module):
        def forward(self, inputs):
            return {"pred": pred[: len(inputs["image"])]}

    batch = {"image": torch.zeros(2, 3, 4, 4), "mask": torch.zeros(2, 1, 4, 4),
             "label": torch.tensor([0, 1]), "index": torch.tensor([0, 1]),
             "filename": ["a.png", "b.png"], "clsname": ["c", "c"]}
    inf = run_inference(Net(), [batch], torch.device("cpu"),
                        {"reduction": "max", "kernel": 1, "topk": 0.01}, progress=False)
    assert inf["maps"].dtype == np.float32
    np.testing.assert_array_equal(inf["maps"], pred[:, 0].numpy())
    assert inf["score"][1] > inf["score"][0]
