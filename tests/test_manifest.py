"""UniAD manifest I/O and MVTec tree scanning, checked against hand-built trees."""
import json

import numpy as np
import cv2
import pytest

from dualmem.datasets.manifest import read_manifest, write_manifest
from dualmem.datasets.prepare.mvtec import build_mvtec_records


def _png(path, value=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size, size), value, np.uint8))


@pytest.fixture
def tree(tmp_path):
    """Two classes in MVTec layout, with stray files that must be ignored."""
    root = tmp_path / "mvtec"
    for cls in ("bottle", "tile"):
        for i in range(3):
            _png(root / cls / "train" / "good" / f"{i:03d}.png")
        _png(root / cls / "test" / "good" / "000.png")
        _png(root / cls / "test" / "good" / "001.JPG")
        for i in range(2):
            _png(root / cls / "test" / "crack" / f"{i:03d}.png", 200)
        _png(root / cls / "ground_truth" / "crack" / "000_mask.png", 255)
        _png(root / cls / "ground_truth" / "crack" / "001_mask.png", 255)
        (root / cls / "test" / "crack" / "notes.txt").write_text("not an image")
        (root / cls / "train" / "good" / ".hidden.png").write_bytes(b"")
    # a defect image whose mask is missing: record without maskname
    _png(root / "tile" / "test" / "glue" / "000.png", 100)
    (root / "license.txt").write_text("x")
    (root / "not_a_class").mkdir()
    return root


def test_build_records_matches_tree(tree):
    train, test = build_mvtec_records(tree)
    assert len(train) == 6
    assert {r["clsname"] for r in train} == {"bottle", "tile"}
    assert all(r["label"] == 0 and r["label_name"] == "good" for r in train)
    assert train[0] == {"filename": "bottle/train/good/000.png", "label": 0,
                        "label_name": "good", "clsname": "bottle"}
    assert len(test) == 4 + 5
    crack = [r for r in test if "/crack/" in r["filename"]]
    assert len(crack) == 4
    assert crack[0] == {"filename": "bottle/test/crack/000.png", "label": 1,
                        "label_name": "defective",
                        "maskname": "bottle/ground_truth/crack/000_mask.png",
                        "clsname": "bottle"}
    assert list(crack[0]) == ["filename", "label", "label_name", "maskname", "clsname"]
    for r in test:
        assert (tree / r["filename"]).is_file()
        if "maskname" in r:
            assert (tree / r["maskname"]).is_file()
    good = [r for r in test if r["label"] == 0]
    assert len(good) == 4 and all("maskname" not in r for r in good)
    assert "tile/test/good/001.JPG" in [r["filename"] for r in good]
    glue = [r for r in test if "/glue/" in r["filename"]]
    assert glue == [{"filename": "tile/test/glue/000.png", "label": 1,
                     "label_name": "defective", "clsname": "tile"}]


def test_build_records_deterministic_and_class_filter(tree):
    assert build_mvtec_records(tree) == build_mvtec_records(tree)
    train, test = build_mvtec_records(tree, classes=["tile"])
    assert {r["clsname"] for r in train + test} == {"tile"}
    assert [r["filename"] for r in train] == sorted(r["filename"] for r in train)


def test_build_records_errors(tree, tmp_path):
    with pytest.raises(ValueError, match="nope.*available.*bottle"):
        build_mvtec_records(tree, classes=["nope"])
    with pytest.raises(FileNotFoundError, match="missing_root"):
        build_mvtec_records(tmp_path / "missing_root")
    (tree / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        build_mvtec_records(tree)


def test_write_read_roundtrip(tmp_path, tree):
    train, test = build_mvtec_records(tree)
    path = tmp_path / "deep" / "dir" / "test.json"
    write_manifest(path, test)
    assert read_manifest(path) == test
    lines = path.read_text().splitlines()
    assert len(lines) == len(test) and json.loads(lines[0]) == test[0]
    assert [p.name for p in path.parent.iterdir()] == ["test.json"]  # no temp files left


def test_write_is_atomic_on_bad_record(tmp_path):
    path = tmp_path / "m.json"
    good = [{"filename": "a.png", "label": 0, "clsname": "c"}]
    write_manifest(path, good)
    with pytest.raises(ValueError, match="label"):
        write_manifest(path, good + [{"filename": "b.png", "clsname": "c"}])
    assert read_manifest(path) == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_read_blank_lines_ok(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('\n{"filename": "a.png", "label": 1, "clsname": "c", "label_name": "defective"}'
                    '\n\n   \n{"filename": "b.png", "label": 0, "clsname": "c"}\n')
    recs = read_manifest(path)
    assert [r["filename"] for r in recs] == ["a.png", "b.png"]


@pytest.mark.parametrize("bad_line, pattern", [
    ('{"filename": "b.png", "label": 0, "clsname": ', r"line 3.*malformed JSON"),
    ('{"filename": "b.png", "label": 0}', r"line 3.*'clsname'"),
    ('{"label": 0, "clsname": "c"}', r"line 3.*'filename'"),
    ('{"filename": "b.png", "label": 2, "clsname": "c"}', r"line 3.*label"),
    ('{"filename": "b.png", "label": true, "clsname": "c"}', r"line 3.*label"),
    ('["b.png", 0, "c"]', r"line 3.*JSON object"),
])
def test_read_errors_name_file_and_line(tmp_path, bad_line, pattern):
    path = tmp_path / "bad.json"
    ok = '{"filename": "a.png", "label": 0, "clsname": "c"}'
    path.write_text(f"{ok}\n\n{bad_line}\n{ok}\n")
    with pytest.raises(ValueError, match=pattern) as exc:
        read_manifest(path)
    assert "bad.json" in str(exc.value)
