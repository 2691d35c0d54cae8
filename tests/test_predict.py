"""tools/predict.py on unlabelled copies of the synthetic test images: same scores as
``--evaluate``, one row and one overlay per image, failures reported without stopping."""
import csv
import shutil

import cv2
import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, tiny_net
from dualmem.tools import predict, train_val
from dualmem.utils import detector as det
from dualmem.utils import prediction


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- fast units
def test_class_of_prefers_flag_then_single_class_then_path():
    classes = ["disc", "weave"]
    assert prediction.class_of("disc/test/good/0.png", "weave", classes) == "weave"
    assert prediction.class_of("x/0.png", None, ["disc"]) == "disc"
    assert prediction.class_of("batch1/weave/0.png", None, classes) == "weave"
    assert prediction.class_of("weave.png", None, classes) is None  # file names do not count
    assert prediction.class_of("other/0.png", None, classes) is None


def test_explicit_threshold_wins_and_unknown_class_uses_pooled():
    th = {"per_class": {"a": {"image_threshold": 1.0, "pixel_threshold": 2.0}},
          "global": {"image_threshold": 5.0, "pixel_threshold": 6.0}}
    assert det.Decider(th)("a")[1:] == ("class", 1.0, 2.0)
    assert det.Decider(th)(None)[1:] == ("global", 5.0, 6.0)
    assert det.Decider(th)("zzz")[1:] == ("global", 5.0, 6.0)
    assert det.Decider(th, 9.0)("a")[1:] == ("explicit", 9.0, 2.0)
    assert det.Decider(th, 9.0, 0.5)(None)[1:] == ("explicit", 9.0, 0.5)


def test_offline_net_forces_pretrained_off():
    net = tiny_net(backbone="efficientnet_lite0")
    net[0]["kwargs"].update(pretrained=True, checkpoint_path="/nowhere/w.pth")
    out = det.offline_net(net)
    assert out[0]["kwargs"]["pretrained"] is False
    assert out[0]["kwargs"]["checkpoint_path"] is None
    assert net[0]["kwargs"]["pretrained"] is True  # input untouched
    assert "pretrained" not in out[1]["kwargs"]  # the neck takes no such argument


def test_find_images_recurses_by_extension(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.JPG", "a/b/notes.txt", "z.bmp"):
        (tmp_path / name).write_bytes(b"")
    rels = [rel for _, rel in prediction.find_images(tmp_path)]
    assert rels == ["a/b/y.JPG", "a/x.png", "z.bmp"]
    assert prediction.find_images(tmp_path / "z.bmp")[0][1] == "z.bmp"
    with pytest.raises(FileNotFoundError, match="--input not found"):
        prediction.find_images(tmp_path / "missing")


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny unified model (2 classes), evaluated once: (evaluation folder, data root,
    last.pth)."""
    tmp = tmp_path_factory.mktemp("predict")
    cfg = {
        "_base_": str(ROOT / "configs" / "runtime.yaml"),
        "random_seed": 11,
        "dataset": {
            "type": "synthetic",
            "synthetic": {"root": str(tmp / "data"), "seed": 4, "classes": ["disc", "weave"],
                          "image_size": 64, "num_train": 6, "num_test_good": 3,
                          "num_test_defect": 1},
            "input_size": [64, 64], "batch_size": 4, "workers": 0,
        },
        "trainer": {"max_epoch": 1, "val_freq_epoch": 1,
                    "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
        "net": tiny_net(),
    }
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    work = tmp / "run"
    common = ["--config", str(cfg_path), "--work_dir", str(work), "--no_progress",
              "--device", "cpu"]
    assert train_val.main(common) == 0
    assert train_val.main(["--work_dir", str(work), "--evaluate", "--no_progress",
                           "--device", "cpu"]) == 0
    evaluation = sorted((work / "evaluations").iterdir())[-1]  # scores.csv, thresholds.json
    return evaluation, tmp / "data", work / "checkpoints" / "last.pth"


def unlabelled_copy(data, dest):
    """The test images only (no masks, no manifests), keeping <class>/test/<defect>/."""
    files = sorted(p for p in data.glob("*/test/*/*.png"))
    for p in files:
        target = dest / p.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, target)
    return files


def run_predict(*args):
    return predict.main([*map(str, args), "--device", "cpu"])


@pytest.mark.slow
def test_predict_on_a_folder_reproduces_evaluate(trained, tmp_path):
    work, data, ckpt = trained
    files = unlabelled_copy(data, tmp_path / "in")
    assert not list((tmp_path / "in").rglob("*mask*"))
    out = tmp_path / "out"
    assert run_predict("--checkpoint", ckpt, "--input", tmp_path / "in", "--output", out,
                       "--batch_size", 3) == 0
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == len(files) == 14
    evaluated = {r["file"]: r for r in read_csv(work / "scores.csv")}
    state = torch.load(ckpt, weights_only=True)
    for row in rows:
        ref = evaluated[row["file"]]
        assert float(row["score"]) == pytest.approx(float(ref["score"]), abs=1e-5)
        assert row["class"] == ref["class"] and row["threshold_from"] == "class:f1(test set)"
        t = state["thresholds"]["per_class"][row["class"]]["image_threshold"]
        assert float(row["image_threshold"]) == t
        assert int(row["is_anomalous"]) == int(float(row["score"]) >= t)
        assert (float(row["normalized_score"]) >= 0.5) == bool(int(row["is_anomalous"]))
        assert row["error"] == ""
        overlay = cv2.imread(str(out / row["overlay"]))
        mask = cv2.imread(str(out / row["mask"]), cv2.IMREAD_GRAYSCALE)
        source = cv2.imread(str(tmp_path / "in" / row["file"]))
        assert mask.shape == source.shape[:2]
        # the overlay: a heading strip above the image (class, score, threshold, verdict) and
        # a colour bar at its right; the heading is red for an anomalous verdict
        h, w = source.shape[:2]
        assert overlay.shape[0] > h and overlay.shape[1] > w
        heading = overlay[:overlay.shape[0] - h].reshape(-1, 3).astype(int)
        red = ((heading[:, 2] > 150) & (heading[:, 1] < 80)).any()
        assert red == bool(int(row["is_anomalous"]))
        assert set(np.unique(mask)) <= {0, 255}
    assert len(list((out / "overlays").rglob("*.png"))) == len(rows)


@pytest.mark.slow
def test_corrupt_file_is_reported_and_the_rest_processed(trained, tmp_path, capsys):
    _, data, ckpt = trained
    src = sorted(data.glob("disc/test/good/*.png"))[:2]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in src:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "readme.txt").write_text("not an image")
    out = tmp_path / "out"
    code = run_predict("--checkpoint", ckpt, "--input", folder, "--output", out,
                       "--class_name", "disc")
    assert code == 1
    rows = {r["file"]: r for r in read_csv(out / "predictions.csv")}
    assert set(rows) == {"broken.png", src[0].name, src[1].name}
    assert "cannot decode" in rows["broken.png"]["error"] and rows["broken.png"]["score"] == ""
    for p in src:
        assert rows[p.name]["error"] == "" and float(rows[p.name]["score"]) > 0
        assert (out / rows[p.name]["overlay"]).is_file()
    assert "1 failed" in capsys.readouterr().out


@pytest.mark.slow
def test_explicit_threshold_and_unknown_class(trained, tmp_path, capsys):
    _, data, ckpt = trained
    image = sorted(data.glob("weave/test/good/*.png"))[0]
    out = tmp_path / "out"
    # a single file outside any class folder: the pooled thresholds, unless --threshold
    assert run_predict("--checkpoint", ckpt, "--input", image, "--output", out) == 0
    (row,) = read_csv(out / "predictions.csv")
    assert row["class"] == "" and row["threshold_from"] == "global:f1(test set)"
    state = torch.load(ckpt, weights_only=True)
    assert float(row["image_threshold"]) == state["thresholds"]["global"]["image_threshold"]
    assert run_predict("--checkpoint", ckpt, "--input", image, "--output", out,
                       "--threshold=-1e9") == 0
    (row,) = read_csv(out / "predictions.csv")
    assert row["threshold_from"] == "explicit" and row["is_anomalous"] == "1"
    # a usage error: one line, exit 2 (it was exit 1, the status of a failed file)
    assert run_predict("--checkpoint", ckpt, "--input", image, "--output", out,
                       "--class_name", "bolt") == 2
    err = capsys.readouterr().err
    assert "'bolt' is not a class of the model in" in err and "disc, weave" in err
    assert str(ckpt) in err and "cache" not in err  # the file the user gave, nothing internal


@pytest.mark.slow
def test_rebuilds_without_weight_download_and_needs_thresholds(trained, tmp_path, capsys):
    _, data, ckpt = trained
    image = sorted(data.glob("disc/test/good/*.png"))[0]
    state = torch.load(ckpt, weights_only=True)
    # resnet18 has no offline weights: building it with pretrained: true would fail here
    state["config"]["net"][0]["kwargs"]["pretrained"] = True
    state["thresholds"] = None
    patched = tmp_path / "patched.pth"
    torch.save(state, patched)
    assert run_predict("--checkpoint", patched, "--input", image, "--output",
                       tmp_path / "o") == 2
    assert "holds no thresholds" in capsys.readouterr().err
    assert run_predict("--checkpoint", patched, "--input", image, "--output", tmp_path / "o",
                       "--threshold", "1.0", "--pixel_threshold", "1.0") == 0
    (row,) = read_csv(tmp_path / "o" / "predictions.csv")
    ref = run_predict("--checkpoint", ckpt, "--input", image, "--output", tmp_path / "r")
    assert ref == 0
    assert float(row["score"]) == float(read_csv(tmp_path / "r" / "predictions.csv")[0]["score"])
    assert row["normalized_score"] == ""  # no stored range to normalise with


@pytest.mark.slow
def test_reduced_precision_predict_and_api_equal_evaluate(tmp_path):
    """bf16 autocast with a float16 feature cache: evaluation runs the backbone once in
    float32 and the rest under autocast; predict.py and the API must run it the same way
    (they ran the whole model under autocast: 5e-3 relative, verdicts flipped)."""
    from dualmem.utils.detector import load_detector

    cfg = {
        "_base_": str(ROOT / "configs" / "runtime.yaml"),
        "random_seed": 3,
        "dataset": {
            "type": "synthetic",
            "synthetic": {"root": str(tmp_path / "data"), "seed": 2, "classes": ["disc"],
                          "image_size": 64, "num_train": 6, "num_test_good": 4,
                          "num_test_defect": 2},
            "input_size": [64, 64], "batch_size": 4, "workers": 0,
        },
        "trainer": {"max_epoch": 1, "val_freq_epoch": 1, "amp": "bf16",
                    "feature_cache": True, "feature_cache_dtype": "float16",
                    "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
        "net": tiny_net(),
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "run"
    assert train_val.main(["--config", str(cfg_path), "--work_dir", str(work),
                           "--no_progress", "--device", "cpu"]) == 0
    ckpt = work / "checkpoints" / "last.pth"
    state = torch.load(ckpt, weights_only=True)
    assert state["inference"]["prefix_modules"] == 2
    assert state["inference"]["prefix_dtype"] == "float16"
    assert train_val.main(["--work_dir", str(work), "--evaluate", "--no_progress",
                           "--device", "cpu"]) == 0
    evaluation = sorted((work / "evaluations").iterdir())[-1]
    evaluated = {r["file"]: float(r["score"]) for r in read_csv(evaluation / "scores.csv")}
    unlabelled_copy(tmp_path / "data", tmp_path / "in")
    out = tmp_path / "out"
    assert run_predict("--checkpoint", ckpt, "--input", tmp_path / "in", "--output", out,
                       "--no_images") == 0
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == len(evaluated) == 12
    detector = load_detector(work)
    for row in rows:
        ref = evaluated[row["file"]]
        assert float(row["score"]) == pytest.approx(ref, rel=1e-6, abs=1e-8), row["file"]
        api = detector.predict(str(tmp_path / "in" / row["file"]), class_name="disc")
        assert api.score == pytest.approx(ref, rel=1e-6, abs=1e-8)
        t = state["thresholds"]["per_class"]["disc"]["image_threshold"]
        assert api.is_anomalous == (ref >= t)
