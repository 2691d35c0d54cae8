"""Issue #26, evaluation side: someone's own photos without masks. No pixel metrics against
invented all-white masks, a key metric that falls back and says so, thresholds set from
held-out good images at a false-reject rate (never trained on), named everywhere, and the
operating point they give on the test set."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, tiny_net
from dualmem.datasets.holdout import HeldOut, hold_out_goods, holdout_count
from dualmem.utils.evaluator import evaluation_notes, metrics_from_inference
from dualmem.utils.thresholds import (compute_thresholds, good_rate_threshold, operating_points,
                              threshold_settings)


def rule(values, rate):
    """The documented good-image rule, written out: the next float above numpy's
    'inverted_cdf' (1 - rate) quantile, in the values' own float type."""
    v = np.asarray(values)
    q = np.quantile(v, 1 - rate, method="inverted_cdf")
    return float(np.nextafter(v.dtype.type(q), v.dtype.type(np.inf)))


# ----------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("seed", range(6))
def test_good_rule_is_the_numpy_quantile_and_rejects_at_most_floor_rate_n(seed):
    rng = np.random.default_rng(seed)
    for n in (1, 3, 20, 99, 100, 101, 250, 1000):
        for rate in (0.001, 0.01, 0.05, 0.1, 0.5):
            scores = rng.normal(size=n)
            if seed % 2:  # ties, as a saturated score gives them
                scores = np.round(scores, 1)
            t = good_rate_threshold(scores, rate)
            assert t == rule(scores, rate)
            rejected = int(np.sum(scores >= t))
            assert rejected <= math.floor(rate * n + 1e-9), (n, rate)
            if n * rate < 1:  # too few goods for the rate: just above their maximum
                assert rejected == 0 and t == np.nextafter(scores.max(), np.inf)
    maps = rng.random((4, 8, 8)).astype(np.float32)  # pixels: float32 kept, so the next
    t = good_rate_threshold(maps, 0.01)              # float survives a float32 comparison
    assert t == rule(maps, 0.01) and np.sum(maps >= t) <= math.floor(0.01 * maps.size)


def inference(seed=0, n_good=6, n_bad=4, size=16):
    """One class 'part': goods, and bad images whose maps are hot where a defect is."""
    rng = np.random.default_rng(seed)
    maps, masks, labels = [], [], []
    for i in range(n_good + n_bad):
        bad = i >= n_good
        m = rng.random((size, size)).astype(np.float32)
        mask = np.zeros((size, size), np.uint8)
        if bad:
            m[4:9, 4:9] += 1.0
            mask[4:9, 4:9] = 1
        maps.append(m)
        masks.append(mask)
        labels.append(int(bad))
    maps = np.stack(maps)
    return {"filename": [f"{i}.png" for i in range(len(labels))],
            "clsname": ["part"] * len(labels), "label": np.asarray(labels),
            "maps": maps, "masks": np.stack(masks), "score": maps.max(axis=(1, 2)) * 1.0,
            "index": np.arange(len(labels))}


def test_a_class_without_masks_has_no_pixel_metrics_and_the_key_metric_falls_back():
    inf = inference()
    with_masks, _ = metrics_from_inference(inf, ["image_auroc", "pixel_auroc", "pixel_aupro"])
    assert with_masks["part"]["pixel_auroc"] is not None
    # the same images, their anomalous ones without a mask file: UniAD's rule would make
    # their masks all white; the pixel metrics are not available instead
    inf["masks"][inf["label"] == 1] = 1
    inf["has_mask"] = inf["label"] == 0
    per_class, mean = metrics_from_inference(inf, ["image_auroc", "pixel_auroc",
                                                   "pixel_aupro"])
    assert per_class["part"]["pixel_auroc"] is None and mean["pixel_auroc"] is None
    assert per_class["part"]["image_auroc"] == with_masks["part"]["image_auroc"]
    notes, used = evaluation_notes(inf, mean, "pixel_auroc")
    assert notes["no_masks"] == ["part"] and used == "image_auroc"
    assert notes["key_metric"] == ("image_auroc (evaluator.key_metric pixel_auroc is not "
                                   "available: no masks for part)")
    good_only = {k: v[:6] for k, v in inf.items()}
    per_class, mean = metrics_from_inference(good_only, ["image_auroc", "pixel_auroc"])
    notes, used = evaluation_notes(good_only, mean, "pixel_auroc")
    assert used is None and notes["key_metric"] == \
        "not available (no anomalies in the test set)"
    assert notes["no_anomalies"] == ["part"] and "no_masks" not in notes


def test_some_anomalies_without_masks_are_left_out_of_the_pixel_figures():
    from dualmem.utils.metrics import compute_class_metrics, f1_optimal_threshold

    inf = inference(seed=5)
    inf["has_mask"] = np.array([True] * 6 + [True, False, True, False])
    inf["masks"][~inf["has_mask"]] = 1  # what UniAD's rule would have made of them
    per_class, _ = metrics_from_inference(inf, ["pixel_auroc", "pixel_ap"])
    real = inf["has_mask"]
    want = compute_class_metrics(None, None, inf["maps"][real], inf["masks"][real],
                                 ["pixel_auroc", "pixel_ap"])
    assert per_class["part"]["pixel_auroc"] == want["pixel_auroc"]
    assert per_class["part"]["pixel_ap"] == want["pixel_ap"]
    notes, used = evaluation_notes(inf, {"pixel_auroc": 0.9}, "pixel_auroc")
    assert used == "pixel_auroc" and "no_masks" not in notes
    assert notes["partial_masks"]["part"].startswith("2 of 4 anomalous test images have no mask")
    e = compute_thresholds(inf, {}, ["part"])["per_class"]["part"]
    assert e["masks"] == "partial" and e["pixel_threshold_source"] == "f1"
    assert e["pixel_threshold"] == f1_optimal_threshold(inf["maps"][real], inf["masks"][real])


def test_thresholds_of_a_class_without_masks_come_from_held_out_goods():
    inf = inference(seed=1)
    inf["masks"][inf["label"] == 1] = 1
    inf["has_mask"] = inf["label"] == 0
    rng = np.random.default_rng(2)
    held = {"clsname": ["part"] * 40, "maps": rng.random((40, 16, 16)).astype(np.float32)}
    held["score"] = held["maps"].max(axis=(1, 2)) * 1.0
    th = compute_thresholds(inf, {}, ["part"], held=held)
    e = th["per_class"]["part"]
    assert e["masks"] == "no_masks"
    assert e["image_threshold_source"] == "good_fpr"
    assert e["image_rule"] == "good_fpr(1%, 40 held-out goods)"
    assert e["image_threshold"] == rule(held["score"], 0.01)
    assert e["image_rule_params"]["rejected_goods"] == np.sum(held["score"] >=
                                                             e["image_threshold"]) == 0
    assert "just above their highest score" in e["image_rule_params"]["note"]  # 40 < 100
    assert e["pixel_rule"] == "good_pixel_rate(0.1%, 40 held-out goods)"
    assert e["pixel_threshold"] == rule(held["maps"], 0.001)
    assert np.sum(held["maps"] >= e["pixel_threshold"]) <= math.floor(0.001 * held["maps"].size)
    # f1 asked for: images by F1 on the test set, pixels never against the invented masks
    f1 = compute_thresholds(inf, {}, ["part"], dict(th["rules"], image_rule="f1",
                                                    pixel_rule="f1"), held=held)
    e = f1["per_class"]["part"]
    assert e["image_threshold_source"] == "f1" and e["pixel_threshold_source"] == \
        "good_pixel_rate"
    assert e["pixel_rule_params"]["note"] == "f1 not available: no masks"
    none = compute_thresholds(inf, {}, ["part"], dict(th["rules"], pixel_rule="none"),
                              held=held)
    assert none["per_class"]["part"]["pixel_threshold"] is None


def test_operating_point_counts_are_a_brute_force_count():
    rng = np.random.default_rng(3)
    inf = {"clsname": ["a"] * 30 + ["b"] * 20, "label": rng.integers(0, 2, 50),
           "score": np.round(rng.random(50), 1)}  # ties at the thresholds
    th = {"per_class": {"a": {"image_threshold": 0.5, "image_rule": "f1(test set)"},
                        "b": {"image_threshold": 0.3, "image_rule": "good_fpr(1%, 4 test goods)"}}}
    points = operating_points(inf, th)
    for cls in ("a", "b"):
        t = th["per_class"][cls]["image_threshold"]
        rows = [(lab, s) for c, lab, s in zip(inf["clsname"], inf["label"], inf["score"])
                if c == cls]
        fr = sum(1 for lab, s in rows if lab == 0 and s >= t)
        es = sum(1 for lab, s in rows if lab == 1 and not s >= t)
        good = sum(1 for lab, _ in rows if lab == 0)
        p = points[cls]
        assert (p["false_rejects"], p["escapes"], p["good"], p["bad"]) == \
            (fr, es, good, len(rows) - good)
        assert p["false_reject_rate"] == fr / good and p["escape_rate"] == es / (len(rows) - good)
        assert p["rule"] == th["per_class"][cls]["image_rule"]


def test_holdout_split_is_goods_only_never_in_training_and_stable():
    from types import SimpleNamespace

    assert [holdout_count(n, 0.1, 20) for n in (1, 2, 6, 40, 100, 1000)] == \
        [0, 1, 3, 20, 20, 100]
    assert holdout_count(10, 25, 20) == 9 and holdout_count(10, 0.5, 1) == 5
    train = [{"filename": f"good/{i:03d}.png", "label": 0, "clsname": c}
             for c in ("mine", "bench") for i in range(30)]
    train.append({"filename": "bad/seen.png", "label": 1, "clsname": "mine",
                  "maskname": "masks/seen.png"})
    test = ([{"filename": "bad/x.png", "label": 1, "clsname": "mine"}] +  # no mask
            [{"filename": "bad/y.png", "label": 1, "clsname": "bench", "maskname": "m.png"}])
    cfg = SimpleNamespace(dataset={"validate": False}, get=lambda k, d=None: {}.get(k, d))
    common = {"image_dir": None, "input_size": [16, 16], "pixel_mean": (0.5,) * 3,
              "pixel_std": (0.5,) * 3}
    kept, held = hold_out_goods(cfg, train, test, common, seed=5)
    assert isinstance(held, HeldOut) and held.counts == {"mine": 15}  # 'bench' has masks: f1
    names = {r["filename"] for r in held.records}
    assert len(names) == 15 and all(r["clsname"] == "mine" and r["label"] == 0
                                    for r in held.records)
    assert not names & {r["filename"] for r in kept if r["clsname"] == "mine"}
    assert len(kept) + len(held.records) == len(train)
    again, held2 = hold_out_goods(cfg, list(reversed(train)), test, common, seed=5)
    assert {r["filename"] for r in held2.records} == names  # order-independent
    _, other = hold_out_goods(cfg, train, test, common, seed=6)
    assert {r["filename"] for r in other.records} != names
    cfg_f1 = SimpleNamespace(dataset={"validate": False}, get=lambda k, d=None: {
        "evaluator": {"thresholds": {"image_rule": "f1", "pixel_rule": "f1"}}}.get(k, d))
    assert hold_out_goods(cfg_f1, train, test, common)[1] is None
    # a benchmark layout (CIFAR-10 has no masks) keeps its protocol's training set under auto
    cifar = SimpleNamespace(dataset={"validate": False}, get=lambda k, d=None: {
        "dataset": {"type": "cifar10"}}.get(k, d))
    assert hold_out_goods(cifar, train, test, common)[1] is None


def test_a_benchmark_without_masks_keeps_f1_images_and_never_invented_pixel_masks():
    inf = inference(seed=4)
    inf["masks"][inf["label"] == 1] = 1
    inf["has_mask"] = inf["label"] == 0
    settings = threshold_settings({"dataset": {"type": "cifar10"}})
    e = compute_thresholds(inf, {}, ["part"], settings)["per_class"]["part"]
    assert e["image_rule"] == "f1(test set)"
    assert e["pixel_rule"] == "good_pixel_rate(0.1%, 6 test goods)"
    assert e["pixel_threshold"] == rule(inf["maps"][inf["label"] == 0], 0.001)


# ----------------------------------------------------------------------------- end to end
def folder_dataset(tmp_path, bad=True):
    """good/ and bad/ (no masks/) from a tiny synthetic class: someone's own photos."""
    from dualmem.datasets.synthetic import ensure_synthetic_dataset

    synth = ensure_synthetic_dataset(tmp_path / "synth", classes=["disc"], image_size=64,
                                     num_train=12, num_test_good=4, num_test_defect=4, seed=4)
    root = tmp_path / "parts"
    (root / "good").mkdir(parents=True)
    for p in sorted((synth / "disc").glob("t*/good/*.png")):
        shutil.copy(p, root / "good" / f"{p.parent.parent.name}_{p.name}")
    if bad:
        (root / "bad").mkdir()
        for p in sorted((synth / "disc" / "test").glob("*/*.png")):
            if p.parent.name != "good":
                shutil.copy(p, root / "bad" / f"{p.parent.name}_{p.name}")
    return root


def train(tmp_path, root, name):
    from dualmem.tools import train_val

    cfg = {"_base_": str(ROOT / "configs" / "runtime.yaml"), "random_seed": 3,
           "dataset": {"input_size": [64, 64], "batch_size": 4, "workers": 0},
           "trainer": {"max_epoch": 1, "val_freq_epoch": 1,
                       "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
           "net": tiny_net()}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / name
    assert train_val.main(["--config", str(path), "--work_dir", str(work), "--data_root",
                           str(root), "--data_type", "folder", "--no_progress", "--device",
                           "cpu", "--threads", "1"]) == 0
    return work


@pytest.mark.slow
def test_folder_without_masks_end_to_end(tmp_path):
    root = folder_dataset(tmp_path)
    work = train(tmp_path, root, "run")
    results = json.loads((work / "results.json").read_text())
    protocol, (cls,) = results["protocol"], results["per_class"]
    assert cls == "parts" and protocol["no_masks"] == ["parts"]
    for values in (results["per_class"][cls], results["mean"]):
        assert all(values[m] is None for m in ("pixel_auroc", "pixel_ap", "pixel_f1max",
                                               "pixel_aupro", "mad"))
        assert values["image_auroc"] is not None
    assert protocol["key_metric"].startswith("image_auroc (evaluator.key_metric pixel_auroc "
                                             "is not available: no masks for parts")
    events = b"".join(p.read_bytes() for p in (work / "events").iterdir())
    assert b"val/parts/image_auroc" in events and b"pixel_auroc" not in events
    log = (work / "log.txt").read_text()
    assert "-inf" not in log and "new best image_auroc" in log
    md = (work / "results.md").read_text()
    assert "Pixel metrics are not available for parts: no masks" in md
    assert "Operating point" in md

    # the held-out goods: 16 goods, 3 to the test set, 6 of the other 13 held out
    state = torch.load(work / "checkpoints" / "last.pth", weights_only=True)
    record = json.loads((work / "run.json").read_text())
    held = set(state["held_out"][cls])
    assert len(held) == holdout_count(13, 0.1, 20) == 6 and record["held_out"] == state["held_out"]
    assert not held & set(state["trained_on"][cls]) and not held & set(state["train_files"])
    assert held <= {f"good/{p.name}" for p in (root / "good").iterdir()}
    assert protocol["thresholds"]["held_out"] == {cls: 6}
    e = state["thresholds"]["per_class"][cls]
    assert e["image_rule"] == "good_fpr(1%, 6 held-out goods)"
    assert e["pixel_rule"] == "good_pixel_rate(0.1%, 6 held-out goods)"
    assert protocol["thresholds"]["image"] == e["image_rule"]
    assert json.loads(json.dumps(state["thresholds"])) == state["thresholds"]

    # the threshold is the documented rule on the held-out goods' scores, as scored by the
    # run's evaluation path, and rejects none of them (6 < 1 / 1%)
    from dualmem.utils.config import load_config
    from dualmem.utils.engine import Trainer

    trainer = Trainer(load_config(work / "config.yaml"), tmp_path / "check",
                      torch.device("cpu"), progress=False)
    trainer.load_state(state, resume=False)
    scored = trainer.score_held_out()
    trainer.close()
    assert {r["filename"] for r in trainer.train_set.holdout.records} == held
    assert e["image_threshold"] == rule(scored["score"], 0.01)
    assert e["pixel_threshold"] == rule(scored["maps"], 0.001)
    assert np.sum(scored["score"] >= e["image_threshold"]) == 0

    # the operating point is a count of the test scores at that threshold (scored again by
    # the Python API, which names the rule it decided by)
    from dualmem.utils.detector import load_detector

    point = results["operating_point"][cls]
    detector = load_detector(work)
    test = trainer.test_set.records
    preds = detector.predict([str(root / r["filename"]) for r in test], class_name=cls)
    assert preds[0].threshold_from == f"class:{e['image_rule']}"
    labels = [int(r["label"]) for r in test]
    scores = [p.score for p in preds]
    assert point["good"] == labels.count(0) and point["bad"] == labels.count(1)
    assert point["false_rejects"] == sum(s >= e["image_threshold"]
                                         for s, lab in zip(scores, labels) if lab == 0)
    assert point["escapes"] == sum(s < e["image_threshold"]
                                   for s, lab in zip(scores, labels) if lab == 1)

    # --evaluate scores the same held-out goods; a checkpoint that was trained on them (a run
    # from before the hold-out) cannot use them: its thresholds fall back to the test goods
    from dualmem.tools import train_val

    common = ["--work_dir", str(work), "--no_progress", "--device", "cpu", "--threads", "1"]
    assert train_val.main(common + ["--evaluate"]) == 0
    out = sorted((work / "evaluations").iterdir())[-1]
    again = json.loads((out / "thresholds.json").read_text())["per_class"][cls]
    assert again["image_rule"] == e["image_rule"]
    assert again["image_threshold"] == e["image_threshold"]
    assert json.loads((out / "thresholds.json").read_text())["rules"]["image_rule"] == "auto"
    old = dict(state, trained_on={cls: sorted(set(state["trained_on"][cls]) | held)})
    torch.save(old, work / "checkpoints" / "old.pth")
    assert train_val.main(common + ["--evaluate", "--checkpoint",
                                    str(work / "checkpoints" / "old.pth")]) == 0
    out = sorted((work / "evaluations").iterdir())[-1]
    legacy = json.loads((out / "thresholds.json").read_text())["per_class"][cls]
    assert legacy["image_rule"] == "good_fpr(1%, 3 test goods)"
    assert "6 of the 6 held-out good images were trained on" in (out / "log.txt").read_text()


@pytest.mark.slow
def test_good_images_only(tmp_path):
    root = folder_dataset(tmp_path, bad=False)
    work = train(tmp_path, root, "good")
    results = json.loads((work / "results.json").read_text())
    assert results["protocol"]["key_metric"] == "not available (no anomalies in the test set)"
    assert results["protocol"]["no_anomalies"] == ["parts"]
    log = (work / "log.txt").read_text()
    assert "-inf" not in log and "best.pth not written" in log
    assert not (work / "checkpoints" / "best.pth").exists()
    point = results["operating_point"]["parts"]
    assert point["bad"] == 0 and point["escape_rate"] is None and point["good"] == 3


def test_a_per_class_run_keeps_each_class_s_operating_point_and_lists_classes_without_masks():
    from dualmem.utils.per_class import combine
    from dualmem.utils.results import operating_point_table

    def one(cls, masks):
        point = {"image_threshold": 0.5, "rule": "good_fpr(1%, 20 held-out goods)",
                 "false_rejects": 1, "good": 20, "false_reject_rate": 0.05, "escapes": 2,
                 "bad": 10, "escape_rate": 0.2}
        protocol = {"dataset": "folder", "epochs": 1, "no_masks": [] if masks else [cls]}
        metrics = {"image_auroc": 0.9}
        return {"protocol": protocol, "per_class": {cls: metrics}, "mean": metrics,
                "operating_point": {cls: dict(point, escapes=len(cls))}, "epoch": 1}

    combined = combine({"a": one("a", True), "bb": one("bb", False), "ccc": one("ccc", False)},
                       ["a", "bb", "ccc"])
    assert combined["protocol"]["no_masks"] == ["bb", "ccc"]
    assert {c: p["escapes"] for c, p in combined["operating_point"].items()} == \
        {"a": 1, "bb": 2, "ccc": 3}
    text = operating_point_table(combined)
    assert text.count("good_fpr(1%, 20 held-out goods)") == 3 and "bb" in text
