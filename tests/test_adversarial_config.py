"""Bad config values are refused before any work starts, with one ``error:`` line naming the key
and no run folder left behind; a hand edit of a run's config.yaml is a change like ``--opts``
(issue #25, items 10 and 11)."""
import hashlib
import json

import pytest
import yaml

from conftest import ROOT, synthetic_dataset, tiny_net

DEMO = ROOT / "experiments" / "demo" / "config.yaml"

# (--opts, text the one error line must hold: the key, and what was expected where it helps)
BAD_VALUES = [
    (["trainer.max_epoch=0"], "'trainer.max_epoch' must be an integer >= 1"),
    (["trainer.max_epoch=-2"], "'trainer.max_epoch' must be an integer >= 1"),
    (["evaluator.image_score.kernel=0"], "'evaluator.image_score.kernel'"),
    (["evaluator.image_score.kernel=-3"], "'evaluator.image_score.kernel'"),
    (["evaluator.image_score.reduction=topk", "evaluator.image_score.topk=0"],
     "'evaluator.image_score.topk' must be a number > 0 and <= 1"),
    (["evaluator.image_score.reduction=topk", "evaluator.image_score.topk=1.5"],
     "'evaluator.image_score.topk'"),
    (["evaluator.thresholds={normal_percentile: 0}"], "'evaluator.thresholds.normal_percentile'"),
    (["dataset.input_size=[0,0]"], "'dataset.input_size'"),
    (["dataset.batch_size=0"], "'dataset.batch_size' must be an integer >= 1"),
    (["dataset.workers=-1"], "'dataset.workers'"),
    (["dataset.synthetic.image_size=16"], "'dataset.synthetic.image_size'"),
    (["trainer.optimizer.kwargs.lr=-1"], "'trainer.optimizer.kwargs.lr' must be a number >= 0"),
    (["trainer.optimizer.kwargs.betas=[0.9,1.5]"], "'trainer.optimizer.kwargs.betas'"),
    (["trainer.optimizer.kwargs.lrr=0.1"], "'trainer.optimizer.kwargs.lrr' for AdamW; did you "
                                           "mean 'lr'?"),
    (["trainer.lr_scheduler.kwargs.T_maxx=5"], "'trainer.lr_scheduler.kwargs.T_maxx' for "
                                               "CosineAnnealingLR; did you mean 'T_max'?"),
    (["trainer.lr_scheduler.type=StepLR"], "'trainer.lr_scheduler.kwargs': StepLR needs "
                                           "step_size"),
    (["trainer.lr_scheduler.type=Cosine"], "'trainer.lr_scheduler.type'"),
    (["net.2.kwargs.nhead=0"], "'net.2.kwargs.nhead' must be an integer >= 1"),
    (["net.2.kwargs.nhead=3"], "'net.2.kwargs.nhead' 3 does not divide hidden_dim 128"),
    (["net.2.kwargs.dropout=1.0"], "'net.2.kwargs.dropout'"),
    (["net.2.kwargs.feature_jitter.probb=0.5"],
     "'net.2.kwargs.feature_jitter.probb'; did you mean 'prob'?"),
    (["net.2.kwargs.feature_jitter.prob=2"], "'net.2.kwargs.feature_jitter.prob'"),
    (["net.2.kwargs.neighbor_mask.neighbour_size=[3,3]"],
     "'net.2.kwargs.neighbor_mask.neighbour_size'; did you mean 'neighbor_size'?"),
    (["net.2.kwargs.neighbor_mask.neighbor_size=[0,3]"], "'net.2.kwargs.neighbor_mask."
                                                         "neighbor_size'"),
    (["net.2.kwargs.initializer.methd=normal"],
     "'net.2.kwargs.initializer.methd'; did you mean 'method'?"),
]


SMALL = ["trainer.max_epoch=1", "dataset.synthetic.classes=[disc]", "dataset.synthetic.num_train=2",
         "dataset.synthetic.num_test_good=1", "dataset.synthetic.num_test_defect=1",
         "dataset.synthetic.image_size=128", "dataset.input_size=[128,128]"]


def train_val(argv):
    from dualmem.tools import train_val as tool

    return tool.main(list(argv) + ["--no_progress", "--device", "cpu", "--threads", "1"])


@pytest.mark.parametrize("opts, expected", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_one_error_line_and_leaves_no_folder(tmp_path, capsys, opts, expected):
    work_dir, data = tmp_path / "run", tmp_path / "data"
    # were a value accepted, the run would be small (its data under tmp_path, one class of
    # few images, one epoch); the case's own opts come last and win
    code = train_val(["--config", str(DEMO), "--work_dir", str(work_dir), "--opts", *SMALL,
                      f"dataset.synthetic.root={data}", *opts])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0] and "(from " in lines[0], err
    assert not work_dir.exists(), "a refused start left a run folder"
    assert not data.exists(), "the data was built before the value was checked"


def test_the_shipped_configs_still_validate():
    from dualmem.utils.config import load_config

    configs = sorted((ROOT / "experiments").rglob("*.yaml")) + sorted(
        (ROOT / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, (old, text)
    path.write_text(text.replace(old, new))


@pytest.mark.slow
def test_hand_edited_config_yaml_is_a_change_and_resume_never_shortens(tmp_path, capsys):
    cfg = {"_base_": str(ROOT / "configs" / "runtime.yaml"), "random_seed": 5,
           "dataset": synthetic_dataset(tmp_path / "data", seed=1, classes=("disc",)),
           "trainer": {"max_epoch": 2, "val_freq_epoch": 2,
                       "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
           "net": tiny_net()}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert train_val(["--config", str(tmp_path / "cfg.yaml"), "--work_dir", str(run)]) == 0
    capsys.readouterr()
    config, record_path = run / "config.yaml", run / "run.json"
    record = json.loads(record_path.read_text())
    assert record["config_sha256"] == sha256(config) and record["history"] == []

    def refused(argv, *expected):
        before = (record_path.read_bytes(), config.read_bytes())
        code = train_val(["--work_dir", str(run), *argv])
        err = capsys.readouterr().err
        assert code == 2, err
        assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, err
        for text in expected:
            assert text in err, err
        assert (record_path.read_bytes(), config.read_bytes()) == before, "a refusal wrote"

    # a resume cannot shorten the run below the 2 epochs its checkpoint has trained
    refused(["--resume", "--override", "--opts", "trainer.max_epoch=1"],
            "trainer.max_epoch 1 is below the 2 epochs")
    edit(config, "max_epoch: 2\n", "max_epoch: 1\n")
    refused(["--resume", "--override"], "trainer.max_epoch 1 is below the 2 epochs")

    # a hand edit is refused like --opts, naming the key, on --resume and --evaluate alike
    edit(config, "max_epoch: 1\n", "max_epoch: 3\n")
    refused(["--resume"], "edited by hand", "trainer.max_epoch: 2 -> 3", "--override")
    refused(["--evaluate"], "edited by hand", "trainer.max_epoch: 2 -> 3")

    # with --override it is recorded: history, protocol, and config.yaml's new hash
    assert train_val(["--work_dir", str(run), "--resume", "--override"]) == 0
    record = json.loads(record_path.read_text())
    assert record["config_sha256"] == sha256(config)
    assert yaml.safe_load(config.read_text())["trainer"]["max_epoch"] == 3
    changes = {c["key"]: (c["old"], c["new"]) for h in record["history"] for c in h["changes"]}
    assert changes["trainer.max_epoch"] == (2, 3)
    assert "edited by hand" in changes["config.yaml"][1]
    overrides = json.loads((run / "results.json").read_text())["protocol"]["overrides"]
    assert any(o.startswith("trainer.max_epoch: 2 -> 3") for o in overrides), overrides
    assert any(o.startswith("config.yaml:") for o in overrides), overrides

    # the rewritten file is the record again: an unchanged evaluation needs no --override
    assert train_val(["--work_dir", str(run), "--evaluate"]) == 0
