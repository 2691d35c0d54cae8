"""Synthetic demo data: layout, masks that match the painted defects, determinism, caching."""
import json

import cv2
import numpy as np
import pytest

from dualmem.datasets.manifest import read_manifest
from dualmem.datasets.prepare.mvtec import build_mvtec_records
from dualmem.datasets.synthetic import (CLASS_SPECS, DEFAULT_CLASSES, ensure_synthetic_dataset,
                                generate_synthetic_dataset, render_sample)
from dualmem.tools.make_synthetic import main

SMALL = dict(image_size=224, num_train=6, num_test_good=3, num_test_defect=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "data"
    summary = generate_synthetic_dataset(root, seed=0, **SMALL)
    return root, summary


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*.png"))}


def test_defaults_have_objects_and_textures():
    kinds = [CLASS_SPECS[c][0] for c in DEFAULT_CLASSES]
    assert kinds.count("object") >= 2 and kinds.count("texture") >= 2
    assert all(len(CLASS_SPECS[c][1]) >= 3 for c in DEFAULT_CLASSES)


def test_layout_and_counts(dataset):
    root, summary = dataset
    assert summary["classes"] == list(DEFAULT_CLASSES)
    train, test = build_mvtec_records(root)
    assert len(train) == 6 * len(DEFAULT_CLASSES)
    for cls in DEFAULT_CLASSES:
        defects = CLASS_SPECS[cls][1]
        counts = summary["counts"][cls]
        assert counts["test_defect"] == {d: 2 for d in defects}
        recs = [r for r in test if r["clsname"] == cls]
        assert len(recs) == counts["test_total"] == 3 + 2 * len(defects)
        assert sorted({r["filename"].split("/")[2] for r in recs}) == sorted({"good", *defects})
        assert not (root / cls / "ground_truth" / "good").exists()
        for r in recs:
            if r["label"] == 0:
                assert "maskname" not in r and r["label_name"] == "good"
            else:
                d = r["filename"].split("/")[2]
                assert r["label_name"] == "defective"
                assert r["maskname"] == r["filename"].replace("/test/", "/ground_truth/") \
                    .replace(".png", "_mask.png")
                assert r["maskname"].startswith(f"{cls}/ground_truth/{d}/")


def test_masks_binary_nonempty_and_sized(dataset):
    root, _ = dataset
    _, test = build_mvtec_records(root)
    for r in test:
        img = cv2.imread(str(root / r["filename"]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (224, 224, 3) and img.dtype == np.uint8
        if r["label"] == 0:
            continue
        mask = cv2.imread(str(root / r["maskname"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (224, 224) and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}, r["maskname"]
        frac = (mask > 0).mean()
        # visible on a 14x14 token grid, yet most of the image stays normal
        assert 0.002 < frac < 0.15, (r["maskname"], frac)
        ys, xs = np.nonzero(mask)
        extent = max(np.ptp(ys), np.ptp(xs)) + 1
        assert 0.05 * 224 <= extent <= 0.5 * 224, (r["maskname"], extent)


def test_defects_differ_from_normal_appearance(dataset):
    """Inside the mask the image departs from the class's mean normal image far more than outside."""
    root, _ = dataset
    train, test = build_mvtec_records(root)
    for cls in DEFAULT_CLASSES:
        normal = np.mean([cv2.imread(str(root / r["filename"])).astype(np.float32)
                          for r in train if r["clsname"] == cls], 0)
        for r in test:
            if r["clsname"] != cls or r["label"] == 0:
                continue
            img = cv2.imread(str(root / r["filename"])).astype(np.float32)
            m = cv2.imread(str(root / r["maskname"]), 0) > 0
            diff = np.abs(img - normal).mean(2)
            assert diff[m].mean() > 1.3 * diff[~m].mean(), r["filename"]


def test_normal_images_vary_but_modestly(dataset):
    root, _ = dataset
    for cls in DEFAULT_CLASSES:
        imgs = [cv2.imread(str(p)).astype(np.float32)
                for p in sorted((root / cls / "train" / "good").glob("*.png"))]
        diffs = [np.abs(imgs[0] - x).mean() for x in imgs[1:]]
        assert min(diffs) > 2, cls     # not copies of one image
        assert max(diffs) < 60, cls    # but the same kind of scene


def test_deterministic_by_seed(dataset, tmp_path):
    root, _ = dataset
    again = tmp_path / "again"
    generate_synthetic_dataset(again, seed=0, **SMALL)
    a, b = _files(root), _files(again)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)

    other = tmp_path / "other"
    generate_synthetic_dataset(other, classes=["disc"], seed=1, **SMALL)
    c = _files(other)
    assert all(c[k] != a[k] for k in c if "/ground_truth/" not in k)


def test_counts_do_not_reshuffle_other_images(tmp_path):
    a = generate_synthetic_dataset(tmp_path / "a", classes=["weave"], seed=3, image_size=96,
                                   num_train=2, num_test_good=1, num_test_defect=1)
    generate_synthetic_dataset(tmp_path / "b", classes=["weave"], seed=3, image_size=96,
                               num_train=4, num_test_good=2, num_test_defect=1)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a["counts"]["weave"]["train"] == 2
    assert all(fa[k] == fb[k] for k in fa)


def test_render_sample_matches_files(dataset):
    root, _ = dataset
    img, mask = render_sample("marble", seed=0, split="test_defect", defect="crack", idx=1)
    assert np.array_equal(img, cv2.imread(str(root / "marble/test/crack/001.png")))
    assert np.array_equal(mask, cv2.imread(str(root / "marble/ground_truth/crack/001_mask.png"),
                                           cv2.IMREAD_UNCHANGED))


def test_errors(tmp_path, dataset):
    root, _ = dataset
    with pytest.raises(ValueError, match="available"):
        generate_synthetic_dataset(tmp_path, classes=["nope"])
    with pytest.raises(FileExistsError, match="disc"):
        generate_synthetic_dataset(root, classes=["disc"], **SMALL)
    with pytest.raises(ValueError, match="no defect"):
        render_sample("disc", defect="crack")


def test_ensure_caches_and_recovers(tmp_path):
    root = tmp_path / "demo"
    kw = dict(classes=["disc", "weave"], image_size=96, num_train=3, num_test_good=1,
              num_test_defect=1, seed=5)
    ensure_synthetic_dataset(root, **kw)
    marker = json.loads((root / ".complete").read_text())
    assert marker["seed"] == 5 and marker["classes"] == ["disc", "weave"]
    train = read_manifest(root / "train.json")
    test = read_manifest(root / "test.json")
    assert (train, test) == build_mvtec_records(root, ["disc", "weave"])
    assert len(train) == 6 and len(test) == 2 * (1 + 4)
    files = _files(root)

    # complete and unchanged: nothing is rewritten, even a deliberately damaged file
    victim = root / "disc/train/good/000.png"
    victim.write_bytes(b"damaged")
    ensure_synthetic_dataset(root, **kw)
    assert victim.read_bytes() == b"damaged"

    # interrupted run (no .complete, our start marker left): regenerated to identical bytes
    (root / ".complete").unlink()
    (root / ".synthetic-generating").write_text("started\n")
    ensure_synthetic_dataset(root, **kw)
    assert _files(root) == files and (root / ".complete").is_file()

    # different parameters: regenerated
    ensure_synthetic_dataset(root, **{**kw, "num_train": 4})
    assert len(read_manifest(root / "train.json")) == 8
    assert json.loads((root / ".complete").read_text())["num_train"] == 4


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--seed", "2", "--classes", "bracket", "--image-size", "96",
                 "--num-train", "2", "--num-test-good", "1", "--num-test-defect", "1"]) == 0
    assert "2 train, 5 test" in capsys.readouterr().out
    assert len(read_manifest(out / "test.json")) == 5


def test_cli_is_a_tool_and_reports_bad_values_in_one_line(tmp_path, capsys):
    """The generator's command line lives in tools/ (datasets/ holds no CLI) and answers a bad
    value like every tool: one ``error:`` line, exit 2, nothing written."""
    import dualmem.datasets.synthetic as synthetic

    assert not hasattr(synthetic, "main")
    out = tmp_path / "bad"
    assert main(["--out", str(out), "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "image_size must be >= 64, got 32" in err
    assert not out.exists()
