"""ManifestDataset (reading, resizing, UniAD's mask rules), joint augmentations, subsampling,
and short end-to-end runs of the CIFAR-10 protocol and the unified/per-class tools."""
import json

import cv2
import numpy as np
import pytest
import torch
import yaml
from easydict import EasyDict

from conftest import ROOT, tiny_net
from dualmem.datasets.builder import build_datasets, subsample
from dualmem.datasets.image_io import ImageReadError
from dualmem.datasets.manifest_dataset import Augment, ManifestDataset, read_binary_mask

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)  # stored BGR by OpenCV
    write(tmp_path / "a.png", rgb)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:15, 10:30] = 255
    write(tmp_path / "a_mask.png", mask)
    return tmp_path, rgb, mask


def dataset(root, records, size=(24, 32), color_mode="RGB", augment=None):
    return ManifestDataset(records, str(root), size, MEAN, STD, color_mode, augment)


def test_image_read_resize_normalise_against_opencv(images):
    root, bgr, mask = images
    rec = {"filename": "a.png", "label": 1, "maskname": "a_mask.png", "clsname": "c"}
    item = dataset(root, [rec])[0]
    ref = cv2.resize(bgr[:, :, ::-1], (32, 24), interpolation=cv2.INTER_LINEAR) / 255.0
    ref = (ref - np.array(MEAN)) / np.array(STD)
    assert item["image"].shape == (3, 24, 32)
    np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    ref_mask = cv2.resize(mask, (32, 24), interpolation=cv2.INTER_NEAREST) > 127
    assert item["mask"].shape == (1, 24, 32)
    assert torch.equal(item["mask"][0], torch.from_numpy(ref_mask.astype(np.float32)))
    assert item["label"] == 1 and item["clsname"] == "c" and item["filename"] == "a.png"

    grey = dataset(root, [rec], color_mode="GRAY")[0]["image"]
    g = cv2.resize(cv2.imread(str(root / "a.png"), cv2.IMREAD_GRAYSCALE), (32, 24)) / 255.0
    for c in range(3):
        np.testing.assert_allclose(grey[c].numpy(), (g - MEAN[c]) / STD[c], atol=1e-5)


def test_missing_mask_rules(images):
    root = images[0]
    ds = dataset(root, [{"filename": "a.png", "label": 0, "clsname": "c"},
                        {"filename": "a.png", "label": 1, "clsname": "c"}])
    assert ds[0]["mask"].sum() == 0
    assert bool((ds[1]["mask"] == 1).all())


def test_read_binary_mask_label_values_and_lossy_masks(tmp_path):
    visa = np.zeros((8, 8), np.uint8)
    visa[2:4, 2:6] = 3
    m = read_binary_mask(write(tmp_path / "v.png", visa))
    assert m.dtype == np.float32 and m.sum() == 8 and m[2, 2] == 1
    noisy = np.zeros((8, 8), np.uint8)
    noisy[0, :] = 255
    noisy[5, 5] = 40  # JPEG-style ringing next to a 0/255 mask
    assert read_binary_mask(write(tmp_path / "n.png", noisy)).sum() == 8
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[1, 1] = (0, 0, 255)
    assert read_binary_mask(write(tmp_path / "c.png", colour)).sum() == 1
    with pytest.raises(ImageReadError, match=r"mask .*n\.png is 8x8 but its image is 9x8"):
        read_binary_mask(tmp_path / "n.png", expected_hw=(8, 9))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match=r"cannot decode mask.*bad\.png"):
        read_binary_mask(tmp_path / "bad.png")
    with pytest.raises(ImageReadError, match=r"mask not found.*nope\.png"):
        read_binary_mask(tmp_path / "nope.png")


def test_dataset_errors_name_the_file(images):
    root = images[0]
    write(root / "small_mask.png", np.zeros((5, 5), np.uint8))
    ds = dataset(root, [{"filename": "a.png", "label": 1, "maskname": "small_mask.png",
                         "clsname": "c"}, {"filename": "gone.png", "label": 0, "clsname": "c"}])
    with pytest.raises(ImageReadError, match=r"small_mask\.png is 5x5 but its image is 40x30"):
        ds[0]
    with pytest.raises(ImageReadError, match=r"gone\.png"):
        ds[1]


# ----------------------------------------------------------------------------- augmentations

def square_pair(h=16, w=16):
    """An image whose red channel is bright exactly where the mask is 1."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    mask = torch.zeros(1, h, w)
    img[0, 2:6, 3:12] = 250
    mask[0, 2:6, 3:12] = 1
    img[1] = torch.arange(w, dtype=torch.uint8) * 7  # asymmetric content
    return img, mask


def test_flips_match_torch_flip():
    img, mask = square_pair()
    out_i, out_m = Augment(hflip=1.0)(img, mask)
    assert torch.equal(out_i, img.flip(-1)) and torch.equal(out_m, mask.flip(-1))
    out_i, out_m = Augment(vflip=1.0)(img, mask)
    assert torch.equal(out_i, img.flip(-2)) and torch.equal(out_m, mask.flip(-2))
    assert type(out_i) is torch.Tensor and type(out_m) is torch.Tensor


def test_random_rot90_is_exact_and_joint():
    img, mask = square_pair()
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        out_i, out_m = Augment(hflip=True, vflip=True, rotate=True)(img, mask)
        assert torch.equal(out_m[0] == 1, out_i[0] == 250)
        seen.add(tuple(out_m[0].nonzero()[0].tolist()))
        assert any(torch.equal(out_i, torch.rot90(v, k, (-2, -1)))
                   for v in (img, img.flip(-1), img.flip(-2), img.flip(-1).flip(-2))
                   for k in range(4))
    assert len(seen) >= 4
    rect_i, rect_m = square_pair(12, 20)
    for _ in range(10):
        out_i, out_m = Augment(rotate=True)(rect_i, rect_m)
        assert out_i.shape == rect_i.shape and out_m.shape == rect_m.shape


def test_rotation_by_degrees_keeps_mask_binary_and_aligned():
    img, mask = square_pair(32, 32)
    torch.manual_seed(1)
    for _ in range(5):
        out_i, out_m = Augment(rotate=30)(img, mask)
        assert set(out_m.unique().tolist()) <= {0.0, 1.0}
        bright = out_i[0] > 125
        agree = (bright == (out_m[0] == 1)).float().mean()
        assert agree > 0.97


def test_colour_jitter_changes_image_only_and_is_seeded():
    img, mask = square_pair()
    aug = Augment(color_jitter={"brightness": 0.5, "contrast": 0.5, "saturation": 0.5,
                                "hue": 0.1})
    torch.manual_seed(3)
    a_i, a_m = aug(img, mask)
    torch.manual_seed(3)
    b_i, b_m = aug(img, mask)
    assert torch.equal(a_i, b_i) and not torch.equal(a_i, img)
    assert torch.equal(a_m, mask) and a_i.dtype == torch.uint8
    assert Augment(color_jitter={"brightness": 0.5, "prob": 0.0})(img, mask)[0].equal(img)
    with pytest.raises(ValueError, match="brightnes"):
        Augment(color_jitter={"brightnes": 0.5})
    assert not Augment().active and Augment(vflip=0.2).active


def test_build_datasets_augments_train_only(tmp_path):
    from tests.test_prepare_data import make_mvtec

    make_mvtec(tmp_path / "m", classes=("a",), size=(16, 16))
    cfg = EasyDict({"random_seed": 0, "config_path": str(tmp_path / "c.yaml"),
                    "dataset": {"type": "mvtec", "data_root": str(tmp_path / "m"),
                                "input_size": [16, 16],
                                "train": {"hflip": True, "subsample": 3},
                                "test": {"subsample": 4}}})
    train, test, classes = build_datasets(cfg, MEAN, STD)
    assert classes == ["a"] and train.augment is not None and test.augment is None
    assert len(train) == 3 and len(test) == 4
    assert {int(r["label"]) for r in test.records} == {0, 1}


def test_subsample_stratified_and_seeded():
    recs = [{"clsname": c, "label": l, "filename": f"{c}{l}{i}"}
            for c, n0, n1 in (("a", 80, 20), ("b", 40, 10)) for l, n in ((0, n0), (1, n1))
            for i in range(n)]
    sub = subsample(recs, 30, seed=0)
    counts = {}
    for r in sub:
        counts[(r["clsname"], r["label"])] = counts.get((r["clsname"], r["label"]), 0) + 1
    assert counts == {("a", 0): 16, ("a", 1): 4, ("b", 0): 8, ("b", 1): 2}
    assert subsample(recs, 30, seed=0) == sub and subsample(recs, 30, seed=1) != sub
    assert [recs.index(r) for r in sub] == sorted(recs.index(r) for r in sub)
    tiny = subsample(recs, 4, seed=0)  # every (class, label) group keeps one
    assert len(tiny) == 4 and len({(r["clsname"], r["label"]) for r in tiny}) == 4
    assert subsample(recs, 0, 0) is recs and subsample(recs, 1000, 0) is recs


# ----------------------------------------------------------------------------- end to end

def write_config(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_cfg(tmp_path, **dataset):
    return {
        "_base_": str(ROOT / "configs" / "runtime.yaml"),
        "random_seed": 5,
        "dataset": {"input_size": [64, 64], "batch_size": 8, "workers": 0, **dataset},
        "trainer": {"max_epoch": 2, "val_freq_epoch": 2,
                    "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}},
                    "lr_scheduler": None},
        "net": tiny_net(),
    }


@pytest.mark.slow
def test_cifar_protocol_end_to_end_on_a_subsample(tmp_path):
    from tests.test_prepare_data import make_cifar_tree
    from dualmem.tools import train_val

    root = make_cifar_tree(tmp_path / "cifar", n_train=8, n_test=6)
    data = tiny_cfg(tmp_path, type="cifar10", cifar10={"normal_classes": [1, 3, 5, 7, 9]},
                    train={"subsample": 24}, test={"subsample": 40})
    data["evaluator"] = {"key_metric": "image_auroc", "metrics": ["image_auroc", "image_ap"],
                         "image_score": {"reduction": "mean"}}
    cfg = write_config(tmp_path / "cifar.yaml", data)
    work = tmp_path / "run"
    assert train_val.main(["--config", str(cfg), "--data_root", str(root), "--work_dir",
                           str(work), "--device", "cpu", "--no_progress"]) == 0
    res = json.loads((work / "results.json").read_text())
    assert list(res["per_class"]) == ["cifar10"] and res["protocol"]["dataset"] == "cifar10"
    assert res["mean"]["pixel_auroc"] is None  # no masks: image metrics only
    assert 0.0 <= res["mean"]["image_auroc"] <= 1.0
    assert "train images: 24, test images: 40" in (work / "log.txt").read_text()


@pytest.mark.slow
def test_per_class_sweep_gives_one_table_with_the_mean(tmp_path):
    from dualmem.tools import train_per_class

    data = tiny_cfg(tmp_path, type="synthetic",
                    synthetic={"root": str(tmp_path / "data"), "seed": 3,
                               "classes": ["disc", "weave"], "image_size": 64, "num_train": 6,
                               "num_test_good": 3, "num_test_defect": 1})
    data["trainer"]["max_epoch"] = 1
    data["trainer"]["val_freq_epoch"] = 1
    cfg = write_config(tmp_path / "cfg.yaml", data)
    work = tmp_path / "sweep"
    argv = ["--config", str(cfg), "--work_dir", str(work), "--device", "cpu", "--no_progress"]
    assert train_per_class.main(argv) == 0
    res = json.loads((work / "results.json").read_text())
    assert list(res["per_class"]) == ["disc", "weave"]
    assert res["protocol"]["setting"] == "per-class"
    for name in ("image_auroc", "pixel_auroc"):
        vals = [res["per_class"][c][name] for c in ("disc", "weave")]
        assert res["mean"][name] == pytest.approx(sum(vals) / 2, abs=1e-12)
    for cls in ("disc", "weave"):
        sub = json.loads((work / cls / "results.json").read_text())
        assert list(sub["per_class"]) == [cls]
        assert (work / cls / "checkpoints" / "best.pth").is_file()
    md = (work / "results.md").read_text()
    assert "| disc" in md and "| weave" in md and "| mean" in md
    # --resume keeps finished classes (no retraining) and rebuilds the same table
    mtime = (work / "disc" / "checkpoints" / "last.pth").stat().st_mtime_ns
    assert train_per_class.main(argv + ["--resume"]) == 0
    assert (work / "disc" / "checkpoints" / "last.pth").stat().st_mtime_ns == mtime
    assert json.loads((work / "results.json").read_text())["per_class"] == res["per_class"]
    # --evaluate re-scores every class's final checkpoint into its own folder: same table
    assert train_per_class.main(argv + ["--evaluate", "--classes", "weave"]) == 0
    again = json.loads((sorted((work / "evaluations").iterdir())[-1] /
                        "results.json").read_text())
    assert list(again["per_class"]) == ["weave"]
    for key, value in res["per_class"]["weave"].items():
        if value is not None:
            assert again["per_class"]["weave"][key] == pytest.approx(value, abs=1e-6)
    # unknown class: one clear line, exit 2
    assert train_per_class.main(argv + ["--classes", "bolt"]) == 2


@pytest.mark.slow
def test_unified_over_two_roots(tmp_path):
    from tests.test_prepare_data import make_mvtec
    from dualmem.tools import train_unified

    a = make_mvtec(tmp_path / "a", classes=("bottle",), size=(64, 64), n_train=4)
    b = make_mvtec(tmp_path / "b", classes=("pcb",), size=(64, 64), n_train=4)
    cfg = write_config(tmp_path / "cfg.yaml",  # cache_dir: keep the merged manifest in tmp
                       tiny_cfg(tmp_path, type="mvtec", cache_dir=str(tmp_path / "cache")))
    work = tmp_path / "uni"
    assert train_unified.main(["--config", str(cfg), "--data_root", str(a), "--data_root",
                               str(b), "--work_dir", str(work), "--device", "cpu",
                               "--no_progress"]) == 0
    res = json.loads((work / "results.json").read_text())
    assert list(res["per_class"]) == ["bottle", "pcb"] and res["protocol"]["setting"] == \
        "unified"
    saved = yaml.safe_load((work / "config.yaml").read_text())
    assert saved["dataset"]["data_root"] == [str(a), str(b)]
    assert len(list((tmp_path / "cache").glob("merged-*/train.json"))) == 1
