"""The pre-training pass over a manifest: each kind of bad file is named with what was wrong."""
import json

import cv2
import numpy as np
import pytest

from dualmem.datasets.validation import DataValidationError, check_classes, validate_records


def png(path, shape=(32, 32, 3), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


@pytest.fixture
def tree(tmp_path):
    recs = []
    for i in range(3):
        png(tmp_path / f"a/good_{i}.png")
        recs.append({"filename": f"a/good_{i}.png", "label": 0, "clsname": "a"})
    png(tmp_path / "a/bad_0.png")
    png(tmp_path / "a/bad_0_mask.png", shape=(32, 32), value=255)
    recs.append({"filename": "a/bad_0.png", "label": 1, "clsname": "a",
                 "maskname": "a/bad_0_mask.png"})
    return tmp_path, recs


def test_clean_records_pass_unchanged(tree):
    root, recs = tree
    keep, problems = validate_records(recs, str(root), "train.json")
    assert keep == recs and problems == []


@pytest.mark.parametrize("damage, message", [
    ("truncated", "cannot be decoded"),
    ("random_bytes", "cannot be decoded"),
    ("missing", "image not found"),
    ("mask_size", "mask .* is 16x16 but its image is 32x32"),
    ("grey", "is greyscale but the other 3 images of class 'a' are colour"),
])
def test_each_fault_is_named(tree, damage, message):
    root, recs = tree
    target = root / "a/good_1.png"
    if damage == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif damage == "random_bytes":
        target.write_bytes(np.random.default_rng(0).bytes(500))
    elif damage == "missing":
        target.unlink()
    elif damage == "mask_size":
        png(root / "a/bad_0_mask.png", shape=(16, 16), value=255)
        target = root / "a/bad_0_mask.png"
    elif damage == "grey":
        png(target, shape=(32, 32))
    with pytest.raises(DataValidationError, match=message) as err:
        validate_records(recs, str(root), "train.json")
    assert str(target) in str(err.value) and "train.json" in str(err.value)


def test_skip_mode_lists_and_drops_the_bad_ones(tree):
    root, recs = tree
    (root / "a/good_2.png").write_bytes(b"not a png")
    keep, problems = validate_records(recs, str(root), "train.json", on_bad_file="skip")
    assert [r["filename"] for r in keep] == ["a/good_0.png", "a/good_1.png", "a/bad_0.png"]
    assert len(problems) == 1 and "good_2.png" in problems[0]


def test_an_all_grey_class_is_fine(tmp_path):
    recs = []
    for i in range(2):
        png(tmp_path / f"g/{i}.png", shape=(8, 8))
        recs.append({"filename": f"g/{i}.png", "label": 0, "clsname": "g"})
    keep, _ = validate_records(recs, str(tmp_path), "m.json")
    assert len(keep) == 2


def test_empty_class_is_an_error():
    train = [{"filename": "x", "label": 0, "clsname": "a"}]
    test = [{"filename": "y", "label": 0, "clsname": "a"},
            {"filename": "z", "label": 1, "clsname": "b"}]
    with pytest.raises(DataValidationError, match="'b' has test images in test.json but no "
                                                  "training images in train.json"):
        check_classes(train, test, "train.json", "test.json")


@pytest.mark.slow
def test_trainer_refuses_bad_data_before_training(tmp_path, capsys):
    from test_engine import make_config
    from dualmem.tools import train_val

    cfg = make_config(tmp_path, epochs=1)
    assert train_val.main(["--config", str(cfg), "--work_dir", str(tmp_path / "ok"),
                           "--no_progress"]) == 0  # generates the data
    victim = next((tmp_path / "data" / "disc" / "train" / "good").glob("*.png"))
    victim.write_bytes(victim.read_bytes()[:200])
    code = train_val.main(["--config", str(cfg), "--work_dir", str(tmp_path / "bad"),
                           "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(victim.name) in err and "cannot be decoded" in err
    assert not (tmp_path / "bad" / "checkpoints").exists()  # nothing trained
    code = train_val.main(["--config", str(cfg), "--work_dir", str(tmp_path / "skip"),
                           "--no_progress", "--opts", "dataset.on_bad_file=skip"])
    assert code == 0
    log = (tmp_path / "skip" / "log.txt").read_text()
    assert "skipping 1 bad record" in log and victim.name in log
    json.loads((tmp_path / "skip" / "results.json").read_text())
