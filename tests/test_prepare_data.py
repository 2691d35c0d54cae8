"""Dataset preparation on small generated trees: counts and fields of every builder, the cache,
and bad inputs failing with the file or class named."""
import json
import os
import pickle

import cv2
import numpy as np
import pytest
from easydict import EasyDict

from dualmem.datasets.manifest import read_manifest
from dualmem.datasets.prepare import PrepareError, ader, check_records, cifar10, folder, mvtec, visa
from dualmem.datasets.prepare import cache as cache_mod
from dualmem.tools import prepare_data


def png(path, value=0, size=(16, 16), channels=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size[::-1] + ((channels,) if channels else ())
    assert cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


def make_mvtec(root, classes=("bottle", "tile"), n_train=4, defects=("crack", "scratch"),
               n_defect=2, n_good=2, size=(16, 16)):
    for cls in classes:
        for i in range(n_train):
            png(root / cls / "train" / "good" / f"{i:03d}.png", 10, size)
        for i in range(n_good):
            png(root / cls / "test" / "good" / f"{i:03d}.png", 10, size)
        for d in defects:
            for i in range(n_defect):
                png(root / cls / "test" / d / f"{i:03d}.png", 200, size)
                png(root / cls / "ground_truth" / d / f"{i:03d}_mask.png", 255, size)
    return root


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Every test's manifest cache in tmp: nothing goes to ~/.cache."""
    folder = tmp_path / "user_cache"
    monkeypatch.setenv("DUALMEM_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def mvtec_tree(tmp_path):
    return make_mvtec(tmp_path / "mvtec")


def run_cli(argv, capsys):
    code = prepare_data.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- MVTec

def test_mvtec_cli_counts_fields_and_default_out(mvtec_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["mvtec", "--root", str(mvtec_tree)], capsys)
    assert code == 0
    default = tmp_path / "data" / "manifests" / "mvtec"  # never the dataset folder
    train = read_manifest(default / "train.json")
    test = read_manifest(default / "test.json")
    assert not (mvtec_tree / "train.json").exists()
    assert len(train) == 8 and len(test) == 2 * (2 + 2 * 2)
    assert sum("maskname" in r for r in test) == 8
    for r in train + test:
        assert (mvtec_tree / r["filename"]).is_file()
        assert r["label_name"] == ("defective" if r["label"] else "good")
        if r["label"]:
            assert r["maskname"].replace("ground_truth", "test").replace("_mask", "") == \
                r["filename"]
    assert "bottle" in out and "with mask" in out and str(default / "train.json") in out
    assert f"image_dir: {mvtec_tree}" in out


def test_mvtec_subset_of_classes_and_out_dir(mvtec_tree, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run_cli(["mvtec", "--root", str(mvtec_tree), "--classes", "tile",
                          "--out", str(out)], capsys)
    assert code == 0
    recs = read_manifest(out / "train.json") + read_manifest(out / "test.json")
    assert {r["clsname"] for r in recs} == {"tile"} and len(recs) == 4 + 6
    assert not (mvtec_tree / "train.json").exists()


def test_mvtec_any_number_of_defect_folders(tmp_path):
    root = make_mvtec(tmp_path / "m", classes=("a",), defects=("d1", "d2", "d3", "d4", "d5"),
                      n_defect=1)
    p = mvtec.build(root)
    assert sorted({r["filename"].split("/")[2] for r in p.test}) == \
        ["d1", "d2", "d3", "d4", "d5", "good"]


def test_mvtec_defect_without_ground_truth_folder_is_whole_image(mvtec_tree):
    png(mvtec_tree / "tile" / "test" / "glue" / "000.png", 50)
    p = check_records(mvtec.build(mvtec_tree))
    glue = [r for r in p.test if "/glue/" in r["filename"]]
    assert glue == [{"filename": "tile/test/glue/000.png", "label": 1,
                     "label_name": "defective", "clsname": "tile"}]


@pytest.mark.parametrize("breakage, pattern", [
    ("missing_mask", r"bottle/test/crack/001\.png has no mask.*001_mask\.png"),
    ("mask_size", r"mask .*bottle/ground_truth/crack/000_mask\.png is 8x8 but its image "
                  r".*000\.png is 16x16"),
    ("unreadable", r"cannot read image .*bottle/test/good/000\.png"),
    ("unreadable_mask", r"cannot read mask .*scratch/001_mask\.png"),
    ("empty_class", r"class 'bottle' has no training images"),
    ("no_test", r"class 'tile' has no test images"),
])
def test_mvtec_bad_inputs_name_the_file_or_class(mvtec_tree, tmp_path, capsys, breakage,
                                                 pattern):
    b, t = mvtec_tree / "bottle", mvtec_tree / "tile"
    if breakage == "missing_mask":
        (b / "ground_truth" / "crack" / "001_mask.png").unlink()
    elif breakage == "mask_size":
        png(b / "ground_truth" / "crack" / "000_mask.png", 255, (8, 8))
    elif breakage == "unreadable":
        (b / "test" / "good" / "000.png").write_bytes(b"not a png at all")
    elif breakage == "unreadable_mask":
        (b / "ground_truth" / "scratch" / "001_mask.png").write_bytes(b"\x89PNG broken")
    elif breakage == "empty_class":
        for p in (b / "train" / "good").iterdir():
            p.unlink()
    elif breakage == "no_test":
        import shutil
        shutil.rmtree(t / "test")
    code, _, err = run_cli(["mvtec", "--root", str(mvtec_tree), "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 2
    assert err.startswith("error: ")
    import re
    assert re.search(pattern, err), err
    assert not (tmp_path / "o" / "train.json").exists()


def test_mvtec_unknown_class_lists_available(mvtec_tree, capsys):
    code, _, err = run_cli(["mvtec", "--root", str(mvtec_tree), "--classes", "bottel"], capsys)
    assert code == 2 and "bottel" in err and "bottle" in err and "tile" in err


def test_missing_root(tmp_path, capsys):
    code, _, err = run_cli(["mvtec", "--root", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "nowhere" in err


# ----------------------------------------------------------------------------- VisA

def make_visa_release(root, classes=("candle", "pcb1")):
    rows = ["object,split,label,image,mask"]
    for cls in classes:
        d = root / cls / "Data"
        for i in range(3):
            png(d / "Images" / "Normal" / f"{i:04d}.JPG", 30, (20, 12), 3)
            rows.append(f"{cls},train,normal,{cls}/Data/Images/Normal/{i:04d}.JPG,")
        png(d / "Images" / "Normal" / "0003.JPG", 30, (20, 12), 3)
        rows.append(f"{cls},test,normal,{cls}/Data/Images/Normal/0003.JPG,")
        for i in range(2):
            png(d / "Images" / "Anomaly" / f"{i:03d}.JPG", 90, (20, 12), 3)
            m = np.zeros((12, 20), np.uint8)
            m[2:5, 3:9] = i + 1  # raw VisA masks hold small label values
            (d / "Masks" / "Anomaly").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / "Masks" / "Anomaly" / f"{i:03d}.png"), m)
            rows.append(f"{cls},test,anomaly,{cls}/Data/Images/Anomaly/{i:03d}.JPG,"
                        f"{cls}/Data/Masks/Anomaly/{i:03d}.png")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa_release_csv(tmp_path, capsys):
    root = make_visa_release(tmp_path / "VisA")
    out = tmp_path / "m"
    code, _, _ = run_cli(["visa", "--root", str(root), "--out", str(out)], capsys)
    assert code == 0
    train, test = read_manifest(out / "train.json"), read_manifest(out / "test.json")
    assert len(train) == 6 and len(test) == 6
    assert {r["clsname"] for r in train} == {"candle", "pcb1"}
    anom = [r for r in test if r["label"] == 1]
    assert len(anom) == 4 and all(r["maskname"].startswith(r["clsname"] + "/Data/Masks/")
                                  for r in anom)
    assert all("maskname" not in r for r in test if r["label"] == 0)
    p = visa.build(root, classes=["pcb1"])
    assert {r["clsname"] for r in p.train + p.test} == {"pcb1"}


@pytest.mark.parametrize("edit, pattern", [
    (lambda rows: rows[:1] + [rows[-1].rsplit(",", 1)[0] + ","], r"1cls\.csv, line 2: .*no mask"),
    (lambda rows: ["object,split,label,image"] + rows[1:], r"missing column.*mask"),
    (lambda rows: rows[:1] + [rows[1].replace("normal", "good")], r"line 2: label must be"),
])
def test_visa_csv_errors_name_line(tmp_path, edit, pattern):
    root = make_visa_release(tmp_path / "VisA", classes=("candle",))
    csv_path = root / "split_csv" / "1cls.csv"
    rows = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(edit(rows)) + "\n")
    with pytest.raises(PrepareError, match=pattern):
        visa.build(root)


def test_visa_unknown_class(tmp_path):
    root = make_visa_release(tmp_path / "VisA")
    with pytest.raises(PrepareError, match=r"unknown class.*'capsule'.*candle"):
        visa.build(root, classes=["capsule"])


def test_visa_converted_tree_masks_without_suffix(tmp_path):
    root = tmp_path / "visa_mvtec"
    png(root / "candle" / "train" / "good" / "000.JPG", 5, (12, 12), 3)
    png(root / "candle" / "test" / "good" / "001.JPG", 5, (12, 12), 3)
    png(root / "candle" / "test" / "bad" / "002.JPG", 5, (12, 12), 3)
    png(root / "candle" / "ground_truth" / "bad" / "002.png", 255, (12, 12))
    p = check_records(visa.build(root))
    assert p.test[0]["maskname"] == "candle/ground_truth/bad/002.png"


# ----------------------------------------------------------------------------- CIFAR-10

def make_cifar_tree(root, n_train=6, n_test=3):
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(cifar10.CLASSES):
            for i in range(n):
                png(root / split / name / f"{i:04d}.jpg", 20 * c, (32, 32), 3)
    return root


def test_cifar_tree_protocol_counts(tmp_path, capsys):
    root = make_cifar_tree(tmp_path / "cifar")
    out = tmp_path / "m01234"
    code, _, _ = run_cli(["cifar10", "--root", str(root), "--normal", "01234", "--out",
                          str(out)], capsys)
    assert code == 0
    train, test = read_manifest(out / "train.json"), read_manifest(out / "test.json")
    normal = set(cifar10.CLASSES[:5])
    assert len(train) == 30 and {r["specie_name"] for r in train} == normal
    assert all(r["label"] == 0 and r["clsname"] == "cifar10" for r in train)
    good = [r for r in test if r["label"] == 0]
    bad = [r for r in test if r["label"] == 1]
    assert len(good) == 15 and len(bad) == 15
    assert {r["specie_name"] for r in good} == normal
    assert not {r["specie_name"] for r in bad} & normal
    assert all("maskname" not in r for r in test)


def test_cifar_anomalous_draw_by_seed(tmp_path):
    root = make_cifar_tree(tmp_path / "cifar", n_train=2, n_test=4)
    a = cifar10.build(root, [0, "automobile"], seed=0)
    b = cifar10.build(root, ["airplane", 1], seed=0)
    c = cifar10.build(root, [0, 1], seed=1)
    assert a.test == b.test and a.train == b.train
    bad = lambda p: [r["filename"] for r in p.test if r["label"]]  # noqa: E731
    assert len(bad(a)) == 8 and len(set(bad(a))) == 8
    assert bad(a) != bad(c)  # 8 of 32 anomalous images: another seed draws others
    assert {r["specie_name"] for r in a.test if r["label"]} <= set(cifar10.CLASSES[2:])


@pytest.mark.parametrize("normal, pattern", [
    ([0, 0], "given twice"), ([10], "out of range"), (["cats"], "unknown CIFAR-10 class"),
    (list(range(10)), "nothing is anomalous"), ([], "no normal classes"),
])
def test_cifar_bad_normal_classes(tmp_path, normal, pattern):
    root = make_cifar_tree(tmp_path / "cifar", 1, 1)
    with pytest.raises(PrepareError, match=pattern):
        cifar10.build(root, normal)


def test_cifar_missing_class_folder(tmp_path):
    root = make_cifar_tree(tmp_path / "cifar", 1, 1)
    import shutil
    shutil.rmtree(root / "test" / "frog")
    with pytest.raises(PrepareError, match=r"class folder missing: .*test/frog"):
        cifar10.build(root)


def write_cifar_pickles(folder, n_per_batch=10, n_test=10, seed=0):
    """The official format: bytes keys, N x 3072 uint8 rows (R, G, B planes), int labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = {}
    for name in (*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH):
        n = n_test if name == cifar10.TEST_BATCH else n_per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.permutation(n) % 10]  # every class present
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        batches[name] = (data, labels)
    return batches


def test_cifar_pickles_exported_pixel_exact(tmp_path, capsys):
    batches = write_cifar_pickles(tmp_path / "raw" / "cifar-10-batches-py")
    out = tmp_path / "out"
    code, _, _ = run_cli(["cifar10", "--root", str(tmp_path / "raw"), "--normal", "0", "7",
                          "--out", str(out)], capsys)
    assert code == 0
    img_dir = out / "cifar10_png"
    data, labels = batches["data_batch_1"]
    first = labels.index(0)  # the first airplane of the first batch is 00000.png
    png_rgb = cv2.imread(str(img_dir / "train" / "airplane" / "00000.png"))[:, :, ::-1]
    assert np.array_equal(png_rgb, data[first].reshape(3, 32, 32).transpose(1, 2, 0))
    n_train = sum(sum(1 for lab in labels if lab in (0, 7))
                  for name, (_, labels) in batches.items() if name != cifar10.TEST_BATCH)
    assert len(read_manifest(out / "train.json")) == n_train
    assert (img_dir / "train" / "horse" / "00000.png").is_file()


# ----------------------------------------------------------------------------- folder

def make_folder(root, n_good=10, n_bad=3, masks=True):
    for i in range(n_good):
        png(root / "good" / f"g{i}.png", 10)
    for i in range(n_bad):
        png(root / "bad" / f"b{i}.png", 200)
        if masks:
            png(root / "masks" / f"b{i}_mask.png", 255)
    return root


def test_folder_split_masks_and_class_name(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "screws")
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_cli(["folder", "--good", str(root / "good"), "--bad", str(root / "bad"),
                          "--masks", str(root / "masks"), "--test-split", "0.3"], capsys)
    assert code == 0
    out = tmp_path / "data" / "manifests" / "folder"
    assert not (root / "train.json").exists()
    train, test = read_manifest(out / "train.json"), read_manifest(out / "test.json")
    assert len(train) == 7 and len(test) == 3 + 3
    assert {r["clsname"] for r in train + test} == {"screws"}
    assert {r["filename"] for r in train}.isdisjoint(r["filename"] for r in test)
    assert sorted(r["maskname"] for r in test if r["label"]) == \
        ["masks/b0_mask.png", "masks/b1_mask.png", "masks/b2_mask.png"]
    again = folder.build(root / "good", root / "bad", root / "masks", 0.3, seed=0)
    other = folder.build(root / "good", test_split=0.3, seed=5, class_name="mine")
    assert again.train == train
    assert {r["filename"] for r in other.train} != {r["filename"] for r in train}
    assert other.train[0]["clsname"] == "mine" and len(other.test) == 3


def test_folder_bad_image_without_mask(tmp_path):
    root = make_folder(tmp_path / "s")
    (root / "masks" / "b1_mask.png").unlink()
    png(root / "masks" / "b1.png", 255)  # the plain-stem name is accepted too
    folder.build(root / "good", root / "bad", root / "masks")
    (root / "masks" / "b1.png").unlink()
    with pytest.raises(PrepareError, match=r"defective image .*bad/b1\.png has no mask"):
        folder.build(root / "good", root / "bad", root / "masks")


def test_folder_errors(tmp_path):
    root = make_folder(tmp_path / "s", n_good=1)
    with pytest.raises(PrepareError, match="no training images left"):
        folder.build(root / "good", test_split=0.9)
    with pytest.raises(PrepareError, match="test_split"):
        folder.build(root / "good", test_split=1.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match=r"good folder .*empty has no images"):
        folder.build(tmp_path / "empty")


# ----------------------------------------------------------------------------- ADer

def test_ader_meta(mvtec_tree, capsys):
    mv = mvtec.build(mvtec_tree)
    meta = {"train": {}, "test": {}}
    for split, recs in (("train", mv.train), ("test", mv.test)):
        for r in recs:
            meta[split].setdefault(r["clsname"], []).append(
                {"img_path": r["filename"], "mask_path": r.get("maskname", ""),
                 "cls_name": r["clsname"], "specie_name": r["filename"].split("/")[2],
                 "anomaly": r["label"]})
    (mvtec_tree / "meta.json").write_text(json.dumps(meta))
    code, _, _ = run_cli(["ader", "--meta", str(mvtec_tree / "meta.json"), "--out",
                          str(mvtec_tree / "from_ader")], capsys)
    assert code == 0
    test = read_manifest(mvtec_tree / "from_ader" / "test.json")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "specie_name"} for r in rs]  # noqa
    assert strip(test) == mv.test
    assert strip(read_manifest(mvtec_tree / "from_ader" / "train.json")) == mv.train
    assert {r["specie_name"] for r in test} == {"good", "crack", "scratch"}

    meta["test"]["tile"][0]["anomaly"] = 2
    (mvtec_tree / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(PrepareError, match=r"meta\.json: test\.tile\[0\]: 'anomaly'"):
        ader.build(mvtec_tree)
    with pytest.raises(PrepareError, match=r"unknown class.*'nut'"):
        ader.build(mvtec_tree / "meta.json", classes=["nut"])


# ----------------------------------------------------------------------------- cache

def test_cache_in_user_cache_reused_and_invalidated(mvtec_tree, user_cache, monkeypatch):
    m = cache_mod.prepare_one("mvtec", mvtec_tree)
    assert m.train.startswith(str(user_cache / "manifests" / "mvtec-"))
    assert m.image_dir == str(mvtec_tree) and not (mvtec_tree / ".dualmem").exists()
    assert len(read_manifest(m.train)) == 8

    def boom(*a, **k):
        raise AssertionError("rebuilt although nothing changed")

    with monkeypatch.context() as patch:
        patch.setattr(cache_mod, "build_source", boom)
        assert cache_mod.prepare_one("mvtec", mvtec_tree) == m
    png(mvtec_tree / "tile" / "train" / "good" / "new.png", 10)
    m2 = cache_mod.prepare_one("mvtec", mvtec_tree)
    assert m2.train == m.train and len(read_manifest(m2.train)) == 9


def test_several_roots_merge_with_absolute_paths(tmp_path, user_cache):
    a = make_mvtec(tmp_path / "a", classes=("bottle",))
    b = make_mvtec(tmp_path / "b", classes=("pcb",), n_train=2)
    m = cache_mod.prepare_manifests("mvtec", [a, b])
    assert m.train.startswith(str(user_cache / "manifests" / "merged-"))
    train = read_manifest(m.train)
    assert m.image_dir is None and len(train) == 6
    assert all(os.path.isabs(r["filename"]) and os.path.isfile(r["filename"]) for r in train)
    test = read_manifest(m.test)
    assert all(os.path.isfile(r["maskname"]) for r in test if "maskname" in r)
    only = cache_mod.prepare_manifests("mvtec", [a, b], classes=["pcb"])
    assert {r["clsname"] for r in read_manifest(only.train)} == {"pcb"}
    make_mvtec(tmp_path / "c", classes=("bottle",))
    with pytest.raises(PrepareError, match=r"class 'bottle' is in both .*a and .*c"):
        cache_mod.prepare_manifests("mvtec", [a, tmp_path / "c"])
    with pytest.raises(PrepareError, match=r"unknown class.*'nut'"):
        cache_mod.prepare_manifests("mvtec", [a, b], classes=["nut", "pcb"])


def test_locate_manifests_from_config(mvtec_tree, tmp_path):
    from dualmem.datasets.builder import locate_manifests

    cfg_dir = tmp_path / "exp"
    cfg_dir.mkdir()
    cfg = EasyDict({"config_path": str(cfg_dir / "config.yaml"),
                    "dataset": {"type": "mvtec", "data_root": "../mvtec"}})
    train, test, image_dir = locate_manifests(cfg, ["tile"])
    assert image_dir == str(mvtec_tree)
    assert {r["clsname"] for r in read_manifest(train)} == {"tile"}
    cfg.dataset.type = "explicit"
    with pytest.raises(ValueError, match="dataset.data_root is set but dataset.type"):
        locate_manifests(cfg)
    cfg.dataset.type, cfg.dataset.data_root = "mvtec", None
    with pytest.raises(ValueError, match=r"dataset.train.meta_file.*--data_root"):
        locate_manifests(cfg)


# ----------------------------------------------------------------------------- read-only data

def tree_state(root):
    """Every path under ``root`` (itself included, dot files too) with its type, size, mtime."""
    import stat

    state = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        state[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size,
                                           st.st_mtime_ns)
    return state


def prepare_like_the_tools(roots, classes=None, data_type="mvtec"):
    """What train_val / train_unified / train_per_class do with --data_root."""
    from dualmem.datasets.builder import locate_manifests
    from dualmem.utils.run_plan import apply_data_args

    cfg = EasyDict({"config_path": None, "dataset": {"type": "explicit"}})
    apply_data_args(cfg, [str(r) for r in roots], data_type)
    return locate_manifests(cfg, classes)


def test_data_root_preparation_never_writes_the_dataset(tmp_path, user_cache, monkeypatch,
                                                        capsys):
    a = make_mvtec(tmp_path / "a")
    b = make_mvtec(tmp_path / "b", classes=("pcb",))
    before = {r: tree_state(r) for r in (a, b)}
    train, test, image_dir = prepare_like_the_tools([a])
    assert image_dir == str(a) and len(read_manifest(train)) == 8
    assert train.startswith(str(user_cache)) and test.startswith(str(user_cache))
    prepare_like_the_tools([a], classes=["tile"])
    prepare_like_the_tools([a, b])  # the merged manifest too
    monkeypatch.chdir(tmp_path)  # the CLI's default output
    assert run_cli(["mvtec", "--root", str(a)], capsys)[0] == 0
    assert {r: tree_state(r) for r in (a, b)} == before


def test_second_run_hits_the_cache_and_roots_never_share_an_entry(tmp_path, user_cache):
    import shutil

    a = make_mvtec(tmp_path / "a")
    first = prepare_like_the_tools([a])
    entry = os.path.dirname(first[0])
    stamps = {n: os.stat(os.path.join(entry, n)).st_mtime_ns
              for n in ("train.json", "test.json", "source.json")}
    calls = []
    real = cache_mod.build_source
    cache_mod.build_source = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert prepare_like_the_tools([a]) == first
        assert calls == []  # nothing rebuilt, nothing rewritten
        assert {n: os.stat(os.path.join(entry, n)).st_mtime_ns for n in stamps} == stamps
        shutil.copytree(a, tmp_path / "copy")  # same layout, same files, another root
        other = prepare_like_the_tools([tmp_path / "copy"])
        assert calls == [1]
    finally:
        cache_mod.build_source = real
    assert os.path.dirname(other[0]) != entry and other[2] == str(tmp_path / "copy")
    assert len(list((user_cache / "manifests").glob("mvtec-*"))) == 2
    assert all(r["filename"] for r in read_manifest(other[0]))


def test_user_cache_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALMEM_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_mod.user_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DUALMEM_CACHE_DIR")
    assert cache_mod.user_cache_dir() == tmp_path / "xdg" / "dualmem"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_mod.user_cache_dir() == tmp_path / "home" / ".cache" / "dualmem"


@pytest.mark.parametrize("where", ["unwritable", "inside_data"])
def test_unusable_cache_falls_back_to_a_temp_folder_with_one_warning(tmp_path, monkeypatch,
                                                                     caplog, where):
    a = make_mvtec(tmp_path / "a")
    if where == "unwritable":  # under a plain file: not creatable, even for root
        (tmp_path / "file").write_text("x")
        monkeypatch.setenv("DUALMEM_CACHE_DIR", str(tmp_path / "file" / "cache"))
    else:
        monkeypatch.setenv("DUALMEM_CACHE_DIR", str(a / ".cache"))
    monkeypatch.setattr(cache_mod, "_WARNED", set())
    before = tree_state(a)
    with caplog.at_level("WARNING", logger="dualmem"):
        train, _, image_dir = prepare_like_the_tools([a])
        again = prepare_like_the_tools([a])
    assert tree_state(a) == before
    assert train.startswith(str(cache_mod._temp_base())) and again[0] == train
    assert image_dir == str(a) and len(read_manifest(train)) == 8
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "for this run only" in warnings[0] and "DUALMEM_CACHE_DIR" in warnings[0]


def test_cli_default_out_inside_the_dataset_is_refused(mvtec_tree, monkeypatch, capsys):
    before = tree_state(mvtec_tree)
    monkeypatch.chdir(mvtec_tree)
    code, _, err = run_cli(["mvtec", "--root", str(mvtec_tree)], capsys)
    assert code == 2 and "--out" in err and "inside the dataset folder" in err
    assert tree_state(mvtec_tree) == before


@pytest.mark.slow
def test_train_val_with_data_root_leaves_the_dataset_untouched(tmp_path, user_cache):
    import yaml

    from conftest import ROOT, tiny_net
    from dualmem.tools import train_val

    root = make_mvtec(tmp_path / "mvtec", classes=("bottle",), n_train=2, defects=("crack",),
                      n_defect=1, n_good=1, size=(64, 64))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "_base_": str(ROOT / "configs" / "runtime.yaml"), "random_seed": 1,
        "dataset": {"type": "mvtec", "input_size": [64, 64], "batch_size": 2, "workers": 0},
        "trainer": {"max_epoch": 1, "val_freq_epoch": 1,
                    "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}},
                    "lr_scheduler": None},
        "net": tiny_net()}))
    before = tree_state(root)
    assert train_val.main(["--config", str(cfg), "--data_root", str(root), "--work_dir",
                           str(tmp_path / "run"), "--device", "cpu", "--no_progress"]) == 0
    assert tree_state(root) == before
    assert list((user_cache / "manifests").glob("mvtec-*/train.json"))
