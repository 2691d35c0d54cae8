"""Panels, ROC plots, thresholds and the evaluation outputs (checked against independent
references: sklearn ROC, brute-force F1 sweeps, numpy percentiles, hand-built tiles)."""
import json

import cv2
import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score, roc_curve

from conftest import ROOT, synthetic_dataset, tiny_net
from dualmem.utils import visualize as V
from dualmem.utils.evaluator import (compute_thresholds, metrics_from_inference, normalized_score,
                             write_scores)
from dualmem.utils.metrics import METRIC_NAMES, image_score_from_map
from dualmem.utils.results import write_results


def brute_f1_threshold(values, labels):
    s, y = np.ravel(values).astype(np.float64), np.ravel(labels) > 0.5
    best, best_t = -1.0, None
    for t in np.unique(s)[::-1]:  # descending: ties in F1 keep the higher threshold
        pred = s >= t
        tp = np.sum(pred & y)
        f1 = 2 * tp / (pred.sum() + y.sum())
        if f1 > best:
            best, best_t = f1, t
    return best_t


def fake_inference(seed=0, n=(6, 5), size=16, anomalies=(True, False)):
    """Two classes: 'a' with anomalies (blobs where the map is hot), 'b' all normal."""
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("filename", "clsname", "label", "maps", "masks")}
    for cls, count, has_anom in zip(("a", "b"), n, anomalies):
        for i in range(count):
            anomalous = has_anom and i % 2 == 1
            mask = np.zeros((size, size), np.uint8)
            amap = rng.random((size, size)).astype(np.float32)
            if anomalous:
                y, x = rng.integers(2, size - 6, 2)
                mask[y:y + 4, x:x + 4] = 1
                amap[y:y + 4, x:x + 4] += rng.random() * 1.5
            defect = "crack" if anomalous else "good"
            out["filename"].append(f"{cls}/test/{defect}/{i:03d}.png")
            out["clsname"].append(cls)
            out["label"].append(int(anomalous))
            out["maps"].append(amap.astype(np.float16))
            out["masks"].append(mask)
    out["maps"] = np.stack(out["maps"])
    out["masks"] = np.stack(out["masks"])
    out["label"] = np.asarray(out["label"])
    out["score"] = image_score_from_map(out["maps"].astype(np.float32), "max", 4)
    out["index"] = np.arange(len(out["label"]))
    return out


# ----------------------------------------------------------------------------- panels
def test_panel_has_four_tiles_in_the_stated_layout():
    rng = np.random.default_rng(1)
    h, w = 40, 48
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    amap = rng.random((h, w)).astype(np.float32)
    amap[10:20, 10:20] += 2.0
    gt = np.zeros((h, w), np.uint8)
    gt[12:18, 12:18] = 1
    lo, hi, t = 0.0, 3.0, 1.5
    panel = V.render_panel(image, gt, amap, lo, hi, t, alpha=0.5)
    # the four tiles, then a gap and the colour bar (tests/test_plots.py checks the bar)
    assert panel.shape == V.panel_shape(h, w) == (
        V.HEADER + h, 4 * w + 4 * V.GAP + V.colorbar_width(), 3) and panel.dtype == np.uint8
    tiles = [panel[V.HEADER:, i * (w + V.GAP):i * (w + V.GAP) + w] for i in range(4)]
    assert np.array_equal(tiles[0], image)
    assert np.array_equal(tiles[1], np.repeat(gt[..., None] * 255, 3, axis=2))
    # overlay: 0.5 * image + 0.5 * JET(normalised map), built here from cv2's colour map
    jet = cv2.applyColorMap(np.round(np.clip((amap - lo) / (hi - lo), 0, 1) * 255)
                            .astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    ref = 0.5 * image.astype(np.float64) + 0.5 * jet
    assert np.abs(tiles[2].astype(np.float64) - ref).max() <= 1.0
    hot, cold = tiles[2][15, 15].astype(int) - image[15, 15] // 2, jet[0, 0]
    assert hot[0] > hot[2] and cold[2] >= cold[0]  # red where hot, blue where cold
    # thresholded tile: white exactly where map >= t, except the green GT outline
    green = np.all(tiles[3] == (0, 200, 0), axis=2)
    assert green.any() and np.all(gt[green] == 1)
    white = np.all(tiles[3] == 255, axis=2)
    assert np.array_equal(white[~green], (amap >= t)[~green])
    # separators and caption strip are white background
    assert np.all(panel[V.HEADER:, w:w + V.GAP] == 255)
    assert (panel[:V.HEADER] < 128).any()  # some caption text


def test_global_and_per_image_normalisation():
    amap = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
    np.testing.assert_allclose(V.normalize_map(amap), [[0, 0.25], [0.5, 1.0]])
    np.testing.assert_allclose(V.normalize_map(amap, 0.0, 10.0), amap / 10.0)
    np.testing.assert_allclose(V.normalize_map(amap, 2.0, 4.0), [[0, 0], [0.5, 1.0]])
    assert not V.normalize_map(np.full((3, 3), 7.0)).any()


def test_vis_panels_capped_round_robin_over_defects():
    inf = {"clsname": ["a"] * 7, "filename": ["a/test/good/0.png", "a/test/good/1.png",
                                                "a/test/good/2.png", "a/test/cut/0.png",
                                                "a/test/cut/1.png", "a/test/hole/0.png",
                                                "a/test/hole/1.png"]}
    assert V.select_for_vis(inf, 3) == [0, 3, 5]
    assert V.select_for_vis(inf, 4) == [0, 3, 4, 5]  # second round: defects alphabetically
    assert V.select_for_vis(inf, None) == list(range(7))
    assert V.defect_name("a/test/broken_large/000.png") == "broken_large"


def test_vis_settings_validate():
    assert V.vis_settings({})["normalize"] == "global"
    assert V.vis_settings({"evaluator": {"vis": {"normalize": "per_image"}}})["normalize"] \
        == "per_image"
    with pytest.raises(ValueError, match="evaluator.vis.max_images"):
        V.vis_settings({"evaluator": {"vis": {"max_images": 0}}})


# ----------------------------------------------------------------------------- ROC
def test_roc_points_match_sklearn_with_ties():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(300), 2)  # many ties
    labels = (rng.random(300) < 0.3 + 0.4 * scores).astype(int)
    x, y = V.roc_points(scores, labels)
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0)
    area = np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2
    assert area == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    # ours keeps only the corners (thresholds holding positives): each is one of sklearn's
    # points, and between them sklearn's extra points lie on our horizontal runs (same area)
    ours = set(zip(np.round(x, 12), np.round(y, 12)))
    assert ours <= set(zip(np.round(fpr, 12), np.round(tpr, 12))) | {(1.0, 1.0)}
    assert V.roc_points(scores, np.zeros(300)) is None


def test_roc_figure_draws_each_class_curve():
    inf = fake_inference()
    fig = V.roc_figure(inf, size=200)
    assert fig.shape == (200, 400, 3)
    color = np.array(V.PALETTE[0])
    near = np.abs(fig.astype(int) - color).sum(axis=2) < 40
    # class 'a' (first colour) has a curve in both plots, beyond the legend swatch
    assert near[:, :200].sum() > 40 and near[:, 200:].sum() > 40


# ----------------------------------------------------------------------------- thresholds
def test_thresholds_f1_optimal_or_the_good_image_rule():
    """A class with anomalies and masks: F1-optimal; one without anomalies: the good-image
    rule (it replaced the undocumented normal_percentile), here on its test goods since
    nothing was held out, named so."""
    inf = fake_inference()
    th = compute_thresholds(inf, {"reduction": "max", "kernel": 4}, ["a", "b"], epoch=3)
    a, b = th["per_class"]["a"], th["per_class"]["b"]
    sel_a = np.asarray(inf["clsname"]) == "a"
    assert a["image_threshold_source"] == a["pixel_threshold_source"] == "f1"
    assert a["image_threshold"] == brute_f1_threshold(inf["score"][sel_a], inf["label"][sel_a])
    assert a["pixel_threshold"] == brute_f1_threshold(inf["maps"][sel_a], inf["masks"][sel_a])
    sel_b = ~sel_a
    assert b["image_threshold_source"] == "good_fpr"
    assert b["image_rule"] == "good_fpr(1%, 5 test goods)"
    assert b["image_threshold"] == np.nextafter(
        np.quantile(inf["score"][sel_b], 0.99, method="inverted_cdf"), np.inf)
    assert b["pixel_rule"] == "good_pixel_rate(0.1%, 5 test goods)"
    assert b["pixel_threshold"] == np.nextafter(
        np.quantile(inf["maps"][sel_b], 0.999, method="inverted_cdf"), np.float16(np.inf))
    assert "just above their highest score" in b["image_rule_params"]["note"]  # 5 < 1 / 1%
    assert b["image_threshold"] > inf["score"][sel_b].max()
    assert b["map_max"] == float(inf["maps"][sel_b].max())
    assert b["image_min"] == float(inf["score"][sel_b].min())
    assert th["epoch"] == 3 and th["global"]["n_images"] == len(inf["label"])
    assert th["global"]["image_threshold"] == brute_f1_threshold(inf["score"], inf["label"])


def test_normalized_score_puts_the_threshold_at_one_half():
    entry = {"image_threshold": 2.0, "image_min": 1.0, "image_max": 5.0}
    assert normalized_score(2.0, entry) == 0.5
    assert normalized_score(4.0, entry) == pytest.approx(1.0)
    assert normalized_score(0.0, entry) == 0.0  # clipped
    for s in np.linspace(0, 6, 61):
        assert (normalized_score(s, entry) >= 0.5) == (s >= 2.0)
    assert normalized_score(3.0, {"image_min": 1.0, "image_max": 5.0}) is None


def test_class_without_anomalies_reports_null_metrics(tmp_path):
    inf = fake_inference()
    per_class, mean = metrics_from_inference(inf, METRIC_NAMES, ["a", "b"])
    for cls in ("a", "b"):
        assert list(per_class[cls]) == METRIC_NAMES + ["mad"]
    assert all(v is None for v in per_class["b"].values())
    assert all(per_class["a"][m] is not None for m in METRIC_NAMES)
    assert per_class["a"]["mad"] == pytest.approx(np.mean([per_class["a"][m]
                                                           for m in METRIC_NAMES]))
    for m in METRIC_NAMES:  # mean over the classes that have the metric
        assert mean[m] == pytest.approx(per_class["a"][m])
    # a restricted metric list still writes all seven keys (None for the others)
    per_class2, _ = metrics_from_inference(inf, ["image_auroc"], ["a", "b"])
    assert per_class2["a"]["pixel_auroc"] is None and per_class2["a"]["image_auroc"] is not None
    write_results({"protocol": {"classes": ["a", "b"]}, "per_class": per_class, "mean": mean},
                  tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["per_class"]["b"]["pixel_aupro"] is None and "mad" in saved["mean"]
    path = write_scores(inf, compute_thresholds(inf, {}, ["a", "b"]), tmp_path)
    assert len(path.read_text().splitlines()) == 1 + len(inf["label"])


# ----------------------------------------------------------------------------- end to end
def make_config(tmp_path, epochs=2):
    cfg = {
        "_base_": str(ROOT / "configs" / "runtime.yaml"),
        "random_seed": 5,
        "dataset": synthetic_dataset(tmp_path / "data", seed=2),
        "trainer": {"max_epoch": epochs, "val_freq_epoch": 1,
                    "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
        "evaluator": {"vis": {"normalize": "global", "tensorboard_panels": 3}},
        "net": tiny_net(),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_training_stores_thresholds_and_evaluate_draws_panels(tmp_path):
    from dualmem.tools import train_val
    from dualmem.utils.config import load_config
    from dualmem.utils.evaluator import run_inference
    from dualmem.utils.metrics import f1_optimal_threshold
    from dualmem.utils.engine import Trainer

    cfg_path = make_config(tmp_path)
    work = tmp_path / "run"
    common = ["--config", str(cfg_path), "--work_dir", str(work), "--no_progress",
              "--device", "cpu"]
    assert train_val.main(common) == 0
    best = torch.load(work / "checkpoints" / "best.pth", weights_only=True)
    last = torch.load(work / "checkpoints" / "last.pth", weights_only=True)
    assert best["thresholds"]["epoch"] == best["epoch"]
    assert last["thresholds"]["epoch"] == last["epoch"] == 2
    events = b"".join(p.read_bytes() for p in (work / "events").iterdir())
    assert b"val/panels" in events and b"val/roc" in events

    # the stored thresholds are metrics.f1_optimal_threshold of best.pth's own maps
    trainer = Trainer(load_config(cfg_path), tmp_path / "check", torch.device("cpu"),
                      progress=False)
    trainer.load_state(best, resume=False)
    inf = run_inference(trainer.model, trainer.test_loader, trainer.device, trainer.score_cfg,
                        progress=False)
    trainer.close()
    names = np.asarray(inf["clsname"])
    for cls in ("disc", "weave"):
        sel = names == cls
        entry = best["thresholds"]["per_class"][cls]
        assert entry["image_threshold"] == f1_optimal_threshold(inf["score"][sel],
                                                                inf["label"][sel])
        assert entry["pixel_threshold"] == f1_optimal_threshold(inf["maps"][sel],
                                                                inf["masks"][sel])
        assert entry["map_min"] == float(inf["maps"][sel].min())

    before = (work / "checkpoints" / "best.pth").read_bytes()
    assert train_val.main(common + ["--evaluate", "--vis", "--checkpoint",
                                    str(work / "checkpoints" / "best.pth")]) == 0
    assert (work / "checkpoints" / "best.pth").read_bytes() == before  # left unchanged
    out = sorted((work / "evaluations").iterdir())[-1]
    assert out.name.startswith("best-")
    saved = json.loads((out / "thresholds.json").read_text())
    assert saved["per_class"]["disc"]["pixel_threshold"] == \
        best["thresholds"]["per_class"]["disc"]["pixel_threshold"]
    panels = sorted((out / "vis").rglob("*.png"))
    assert len(panels) == len(inf["filename"])
    for fname, cls in zip(inf["filename"], inf["clsname"]):
        parts = fname.split("/")
        path = out / "vis" / cls / parts[-2] / parts[-1]
        img = cv2.imread(str(path))
        assert img is not None, path
        assert img.shape == V.panel_shape(64, 64, heading=True)  # verdict heading, bar
    assert (out / "vis" / "disc" / "good").is_dir()
