"""Review of the issue #25 hardening: what still got through. Non-finite and sign-flipping
numbers, an empty net, a zero stride, values refused only after training (eps 0: nan loss;
vis.max_images 0: the final evaluation), a class name that is a path, a run stopped before its
first checkpoint, sweep cells sharing a folder or a bad cell value found after hours of
training, a seen anomaly listed twice or linked under another name, a hand edit of a
per-class sweep's class config."""
import json
import os

import pytest
import yaml

from conftest import ROOT, synthetic_dataset, tiny_net
from dualmem.utils.errors import UserError

CPU = ["--no_progress", "--device", "cpu", "--threads", "1"]


def write_cfg(tmp_path, **dataset):
    cfg = {"_base_": str(ROOT / "configs" / "runtime.yaml"), "random_seed": 7,
           "dataset": dict(synthetic_dataset(tmp_path / "data", seed=3), **dataset),
           "trainer": {"max_epoch": 1, "val_freq_epoch": 1,
                       "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
           "net": tiny_net(hidden_dim=16)}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# --- values that passed validation and wrecked the run (or raised a traceback) -------------
BAD = [(["trainer.optimizer.kwargs.lr=.inf"], "'trainer.optimizer.kwargs.lr' must be a finite"),
       (["trainer.clip_max_norm=.nan"], "'trainer.clip_max_norm'"),
       (["trainer.clip_max_norm=-1"], "'trainer.clip_max_norm' must be a number >= 0"),
       (["dataset.pixel_mean=[.nan,0,0]"], "'dataset.pixel_mean.0' must be a finite number"),
       (["net.2.kwargs.feature_jitter.scale=.inf"], "'net.2.kwargs.feature_jitter.scale'"),
       (["net.1.kwargs.outstrides=[0]"], "'net.1.kwargs.outstrides'"),
       (["net=[]"], "'net' lists no module"),
       (["trainer.optimizer.kwargs.eps=0"], "'trainer.optimizer.kwargs.eps' must be a number > 0"),
       (["evaluator.vis.max_images=0"], "'evaluator.vis.max_images' must be an integer >= 1")]


@pytest.mark.parametrize("opts, expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_nonfinite_negative_or_empty_values_are_refused_up_front(tmp_path, capsys, opts,
                                                                 expected):
    from dualmem.tools import train_val

    run = tmp_path / "run"
    code = train_val.main(["--config", str(write_cfg(tmp_path)), "--work_dir", str(run),
                           "--opts", *opts] + CPU)
    line = one_error_line(capsys)
    assert code == 2 and expected in line, line
    assert not run.exists()


# --- a class name is a folder name -----------------------------------------------------------
def test_a_manifest_class_name_that_is_a_path_is_refused(tmp_path, capsys):
    from dualmem.datasets.manifest import check_class_name, read_manifest
    from dualmem.tools import train_per_class

    for bad in ("../../escaped", "/tmp/escaped", "a\\b", "..", "."):
        with pytest.raises(UserError, match="not a valid class name"):
            check_class_name(bad, "x")
    check_class_name("metal_nut", "x")
    line = json.dumps({"filename": "a/train/good/0.png", "label": 0, "clsname": "../../esc"})
    for split in ("train", "test"):
        (tmp_path / f"{split}.json").write_text(line + "\n")
    with pytest.raises(UserError, match="train.json, line 1: 'clsname'"):
        read_manifest(tmp_path / "train.json")
    cfg = yaml.safe_load(write_cfg(tmp_path).read_text())
    ds = cfg["dataset"]
    ds.pop("synthetic")
    ds.update(type="explicit", train={"meta_file": str(tmp_path / "train.json")},
              test={"meta_file": str(tmp_path / "test.json")})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    work = tmp_path / "a" / "b" / "run"
    code = train_per_class.main(["--config", str(tmp_path / "cfg.yaml"), "--work_dir",
                                 str(work)] + CPU)
    assert code == 2 and "not a valid class name" in one_error_line(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "esc").exists()


# --- a run stopped before its first checkpoint ----------------------------------------------
def test_a_run_stopped_before_its_first_checkpoint_resumes(tmp_path, monkeypatch, capsys):
    """A signal (or a crash) in stage one left run.json but no checkpoint: --resume said
    'checkpoint not found' and a new start said 'continue it with --resume'."""
    from dualmem.tools import train_val
    from dualmem.utils.engine import Trainer

    def stopped(self):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "prepare_modules", stopped)
        with pytest.raises(KeyboardInterrupt):
            train_val.main(["--config", str(write_cfg(tmp_path)), "--work_dir", str(run)] + CPU)
    assert (run / "run.json").is_file() and not (run / "checkpoints" / "last.pth").exists()
    assert train_val.main(["--work_dir", str(run), "--resume"] + CPU) == 0
    assert json.loads((run / "results.json").read_text())["epoch"] == 1


# --- sweeps ----------------------------------------------------------------------------------
def test_sweep_refuses_cells_sharing_a_folder_and_bad_cell_values_before_training(
        tmp_path, capsys):
    from dualmem.tools import sweep

    cfg = write_cfg(tmp_path)
    for grid, expected in (("net.2.kwargs.hidden_dim=16,16", "several cells the folder"),
                           ("evaluator.key_metric=a b,a_b", "several cells the folder"),
                           ("trainer.optimizer.kwargs.lr=1e-3,-1",
                            "'trainer.optimizer.kwargs.lr' must be a number >= 0")):
        work = tmp_path / "sweep"
        code = sweep.main(["--config", str(cfg), "--work_dir", str(work), "--grid", grid] + CPU)
        line = one_error_line(capsys)
        assert code == 2 and expected in line, line
        assert not work.exists() and not (tmp_path / "data").exists()


# --- the leak guard --------------------------------------------------------------------------
def test_a_seen_anomaly_listed_twice_linked_or_copied_is_never_scored(tmp_path):
    from dualmem.datasets.seen_anomalies import refuse_scored_anomalies

    (tmp_path / "c" / "test" / "crack").mkdir(parents=True)
    seen = tmp_path / "c" / "test" / "crack" / "000.png"
    seen.write_bytes(b"the anomaly" * 10)
    other = tmp_path / "c" / "test" / "crack" / "001.png"
    other.write_bytes(b"another one" * 10)  # the same size, other bytes
    (tmp_path / "c" / "test" / "link.png").symlink_to(seen)
    (tmp_path / "c" / "test" / "COPY.PNG").write_bytes(seen.read_bytes())
    rec = lambda name, label=1: {"filename": name, "label": label, "clsname": "c"}  # noqa
    train = [rec("c/train/good/000.png", 0), rec("c/test/crack/000.png")]
    refuse_scored_anomalies(train, [rec("c/test/crack/001.png")], str(tmp_path))
    refuse_scored_anomalies(train[:1], [rec("c/test/crack/000.png")], str(tmp_path))
    for name in ("c/test/crack/000.png", "c/test/link.png", "c/test/COPY.PNG",
                 str(seen)):  # listed twice, a symlink, a copy, an absolute name
        with pytest.raises(UserError, match="labelled anomalies the run trains on"):
            refuse_scored_anomalies(train, [rec("c/test/crack/001.png"), rec(name)],
                                    str(tmp_path))


def test_a_duplicated_test_record_of_a_drawn_seen_anomaly_stops_the_build(tmp_path):
    """The draw moves one record out of the test set; its twin stayed and was scored."""
    from dualmem.datasets.builder import build_datasets
    from dualmem.datasets.seen_anomalies import split_seen_anomalies
    from easydict import EasyDict

    (tmp_path / "c" / "test" / "crack").mkdir(parents=True)
    recs = []
    for i in range(3):
        path = tmp_path / "c" / "test" / "crack" / f"{i:03d}.png"
        path.write_bytes(bytes([i]) * 50)
        recs.append({"filename": f"c/test/crack/{i:03d}.png", "label": 1, "clsname": "c",
                     "maskname": f"c/gt/{i:03d}.png"})
    test = recs + [dict(r) for r in recs]
    seen, left = split_seen_anomalies(test, 1, seed=0)
    assert seen[0]["filename"] in [r["filename"] for r in left]  # what the guard must catch
    train = [{"filename": "c/train/good/000.png", "label": 0, "clsname": "c"}]
    (tmp_path / "train.json").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "test.json").write_text("".join(json.dumps(r) + "\n" for r in test))
    cfg = EasyDict({"random_seed": 0, "dataset": {
        "type": "explicit", "input_size": [64, 64], "validate": False,
        "image_reader": {"type": "opencv", "kwargs": {"image_dir": str(tmp_path)}},
        "train": {"meta_file": str(tmp_path / "train.json")},
        "test": {"meta_file": str(tmp_path / "test.json")},
        "seen_anomalies": {"num_per_class": 1, "seed": 0}}})
    with pytest.raises(UserError, match="labelled anomalies the run trains on"):
        build_datasets(cfg, [0.5] * 3, [0.25] * 3)


# --- hand edits ------------------------------------------------------------------------------
def test_a_hand_edit_of_a_class_config_is_refused_on_per_class_resume(tmp_path, capsys):
    from dualmem.tools import train_per_class

    work = tmp_path / "run"
    assert train_per_class.main(["--config", str(write_cfg(tmp_path)), "--work_dir",
                                 str(work)] + CPU) == 0
    weave = work / "weave"
    (weave / "results.json").unlink()  # as if stopped before its results
    text = (weave / "config.yaml").read_text()
    assert text.count("reduction: max") == 1
    (weave / "config.yaml").write_text(text.replace("reduction: max", "reduction: mean"))
    capsys.readouterr()
    assert train_per_class.main(["--work_dir", str(work), "--resume"] + CPU) == 2
    line = capsys.readouterr().err
    assert "edited by hand" in line and "evaluator.image_score.reduction" in line, line
    assert not (weave / "results.json").exists()
    assert train_per_class.main(["--work_dir", str(work), "--resume", "--override"] + CPU) == 0
    history = json.loads((weave / "run.json").read_text())["history"]
    assert [c["key"] for h in history for c in h["changes"]] == [
        "evaluator.image_score.reduction"]
    assert os.path.isfile(weave / "results.json")


def test_synthetic_root_never_overwrites_a_folder_of_other_data(tmp_path):
    """A config (or a received run folder) pointing dataset.synthetic.root at real data must
    not delete its class folders or manifests."""
    from dualmem.datasets.synthetic import ensure_synthetic_dataset
    from dualmem.utils.errors import UserError

    real = tmp_path / "mydata"
    (real / "disc" / "train" / "good").mkdir(parents=True)
    (real / "disc" / "train" / "good" / "photo.png").write_bytes(b"precious")
    (real / "train.json").write_text("mine\n")
    with pytest.raises(UserError, match="not a DualMem synthetic dataset"):
        ensure_synthetic_dataset(real, classes=["disc"], image_size=64, num_train=1,
                                 num_test_good=1, num_test_defect=1)
    assert (real / "disc" / "train" / "good" / "photo.png").read_bytes() == b"precious"
    assert (real / "train.json").read_text() == "mine\n"
    fresh = tmp_path / "fresh"
    ensure_synthetic_dataset(fresh, classes=["disc"], image_size=64, num_train=1,
                             num_test_good=1, num_test_defect=1)
    assert (fresh / ".complete").is_file() and not (fresh / ".synthetic-generating").exists()
    # an interrupted generation of ours (its marker left) is simply redone
    (fresh / ".complete").unlink()
    (fresh / ".synthetic-generating").write_text("x")
    ensure_synthetic_dataset(fresh, classes=["disc"], image_size=64, num_train=1,
                             num_test_good=1, num_test_defect=1)
    assert (fresh / ".complete").is_file()
