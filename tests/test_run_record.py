"""The run folder is the record: resume, evaluate and report from it alone; changes are refused
or recorded; failed starts leave nothing; checkpoints never run code when opened."""
import json
import math
import os
import re
import shlex
import shutil

import pytest
import torch
import yaml

from conftest import ROOT, synthetic_dataset, tiny_dmad_net, tiny_net

pytestmark = pytest.mark.slow


def write_cfg(path, epochs=2, scheduler=None, **dataset):
    cfg = {
        "_base_": str(ROOT / "configs" / "runtime.yaml"),
        "random_seed": 7,
        "dataset": {**synthetic_dataset(path.parent / "data", seed=3), **dataset},
        "trainer": {"max_epoch": epochs, "val_freq_epoch": 1,
                    "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}},
                    "lr_scheduler": scheduler},
        "net": tiny_net(),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def main(tool, argv):
    from dualmem.tools import train_per_class, train_unified, train_val

    module = {"train_val": train_val, "train_unified": train_unified,
              "train_per_class": train_per_class}[tool]
    return module.main(list(argv) + ["--no_progress", "--device", "cpu"])


def newest_evaluation(run):
    found = sorted((run / "evaluations").iterdir())
    assert found, f"no evaluation under {run}"
    return found[-1]


def assert_same_metrics(a, b):
    for cls in a["per_class"]:
        for key, value in a["per_class"][cls].items():
            if value is not None:
                assert b["per_class"][cls][key] == pytest.approx(value, abs=1e-6), (cls, key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-class run (--class_name) and one unified run, 2 epochs each."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = write_cfg(tmp / "cfg.yaml")
    single, unified = tmp / "single", tmp / "unified"
    assert main("train_val", ["--config", str(cfg), "--work_dir", str(single),
                              "--class_name", "weave"]) == 0
    assert main("train_unified", ["--config", str(cfg), "--work_dir", str(unified)]) == 0
    return {"cfg": cfg, "single": single, "unified": unified, "tmp": tmp}


@pytest.mark.parametrize("which, tool, setting, classes", [
    ("single", "train_val", "single-class", ["weave"]),
    ("unified", "train_unified", "unified", ["disc", "weave"]),
    ("unified", "train_val", "unified", ["disc", "weave"]),
])
def test_evaluate_from_the_run_folder_alone(runs, which, tool, setting, classes):
    run = runs[which]
    trained_bytes = (run / "results.json").read_bytes()
    trained = json.loads(trained_bytes)
    record = json.loads((run / "run.json").read_text())
    assert record["setting"] == setting and record["classes"] == classes
    assert trained["protocol"]["setting"] == setting and trained["protocol"]["epochs"] == 2

    assert main(tool, ["--work_dir", str(run), "--evaluate"]) == 0
    assert (run / "results.json").read_bytes() == trained_bytes  # never rewritten
    out = newest_evaluation(run)
    again = json.loads((out / "results.json").read_text())
    assert list(again["per_class"]) == classes
    assert_same_metrics(trained, again)
    assert again["protocol"]["epochs"] == 2 and again["protocol"]["setting"] == setting
    assert again["epoch"] == 2 and again["protocol"]["reported"].startswith("checkpoint last")
    assert (out / "scores.csv").is_file() and (out / "thresholds.json").is_file()


def test_changed_flags_are_refused_then_recorded_with_override(runs, capsys):
    run = runs["unified"]
    code = main("train_val", ["--work_dir", str(run), "--evaluate", "--opts",
                              "evaluator.image_score.kernel=8", "trainer.max_epoch=9"])
    err = capsys.readouterr().err
    assert code == 2 and "trainer.max_epoch: 2 -> 9" in err
    assert "evaluator.image_score.kernel" in err
    code = main("train_val", ["--work_dir", str(run), "--evaluate", "--class_name", "disc"])
    err = capsys.readouterr().err
    assert code == 2 and "--class_name: None -> 'disc'" in err
    # a different config file: every changed key is listed
    other = write_cfg(runs["tmp"] / "other.yaml", epochs=4)
    code = main("train_val", ["--config", str(other), "--work_dir", str(run), "--evaluate"])
    assert code == 2 and "trainer.max_epoch: 2 -> 4" in capsys.readouterr().err
    # the run's own config plus departures (prose, as after an upgrade): not a change
    same = yaml.safe_load(runs["cfg"].read_text())
    same["departures"] = {"schedule": "2 epochs (paper 1000)"}
    (runs["tmp"] / "same.yaml").write_text(yaml.safe_dump(same))
    assert main("train_val", ["--config", str(runs["tmp"] / "same.yaml"), "--work_dir",
                              str(run), "--evaluate"]) == 0


def test_resume_from_the_run_folder_is_exact_and_extension_is_an_override(
        tmp_path, monkeypatch, capsys):
    from dualmem.utils.engine import Trainer

    sched = {"type": "CosineAnnealingLR", "kwargs": {}}
    cfg = write_cfg(tmp_path / "cfg.yaml", epochs=3, scheduler=sched)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main("train_val", ["--config", str(cfg), "--work_dir", str(full)]) == 0

    original = Trainer.train_one_epoch

    def dies_in_epoch_3(self, epoch, start_step=0):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch, start_step)

    monkeypatch.setattr(Trainer, "train_one_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        main("train_val", ["--config", str(cfg), "--work_dir", str(part)])
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    assert main("train_val", ["--work_dir", str(part), "--resume"]) == 0  # no --config
    a = torch.load(full / "checkpoints" / "last.pth", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key

    # extending training is a change of the run: refused, then accepted and recorded
    code = main("train_val", ["--work_dir", str(part), "--resume", "--opts",
                              "trainer.max_epoch=5"])
    err = capsys.readouterr().err
    assert code == 2 and "trainer.max_epoch: 3 -> 5" in err
    assert yaml.safe_load((part / "config.yaml").read_text())["trainer"]["max_epoch"] == 3
    assert main("train_val", ["--work_dir", str(part), "--resume", "--override", "--opts",
                              "trainer.max_epoch=5"]) == 0
    state = torch.load(part / "checkpoints" / "last.pth", weights_only=True)
    assert state["epoch"] == 5
    # the schedule was rebuilt for 5 epochs: after epoch 5 the cosine is at its end, and
    # after epoch 4 (in the log) it was where a 5-epoch plan puts it
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    lr4 = 1e-3 * (1 + math.cos(math.pi * 4 / 5)) / 2
    assert "epoch 4/5 loss" in (part / "log.txt").read_text()
    assert re.search(rf"epoch 4/5 loss \S+ lr {lr4:.2e}", (part / "log.txt").read_text())
    record = json.loads((part / "run.json").read_text())
    change = record["history"][-1]
    assert change["action"] == "resume"
    assert change["changes"] == [{"key": "trainer.max_epoch", "old": 3, "new": 5}]
    results = json.loads((part / "results.json").read_text())
    assert results["protocol"]["epochs"] == 5
    assert any("trainer.max_epoch: 3 -> 5" in o for o in results["protocol"]["overrides"])
    assert yaml.safe_load((part / "config.yaml").read_text())["trainer"]["max_epoch"] == 5


def test_semi_supervised_checkpoint_refuses_a_test_set_with_its_seen_anomalies(
        tmp_path, capsys):
    data = synthetic_dataset(tmp_path / "data", seed=3, image_size=64, num_train=6,
                             num_test_good=2, num_test_defect=2, batch_size=8)
    base = {"_base_": str(ROOT / "experiments" / "demo" / "dmad.yaml"), "random_seed": 1,
            "net": tiny_dmad_net(), "trainer": {"max_epoch": 1, "val_freq_epoch": 1}}
    semi = tmp_path / "semi.yaml"
    semi.write_text(yaml.safe_dump({**base, "dataset": {
        **data, "seen_anomalies": {"num_per_class": 1, "seed": 0}}}))
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({**base, "dataset": data}))
    run = tmp_path / "run"
    assert main("train_val", ["--config", str(semi), "--work_dir", str(run)]) == 0
    seen = json.loads((run / "run.json").read_text())["seen_anomalies"]["files"]
    assert len(seen) == 2

    code = main("train_val", ["--config", str(plain), "--work_dir", str(run), "--evaluate"])
    err = capsys.readouterr().err
    assert code == 2 and any(f in err for f in seen), err
    code = main("train_val", ["--config", str(plain), "--work_dir", str(run), "--evaluate",
                              "--override"])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on" in err and any(f in err for f in seen), err
    # the run's own record keeps them out of the test set
    assert main("train_val", ["--work_dir", str(run), "--evaluate"]) == 0
    res = json.loads((newest_evaluation(run) / "results.json").read_text())
    assert res["protocol"]["seen_anomalies"]["files"] == seen


def tree(folder):
    return sorted((str(p.relative_to(folder)), p.is_dir()) for p in folder.rglob("*")) \
        if folder.exists() else None


def test_failed_starts_leave_nothing_and_newest_means_a_run_with_a_checkpoint(
        tmp_path, capsys):
    cfg = write_cfg(tmp_path / "cfg.yaml", epochs=1)
    runs = tmp_path / "runs"
    assert main("train_val", ["--config", str(cfg)]) == 0
    good = [p for p in runs.iterdir()]
    assert len(good) == 1
    before = tree(runs)
    assert main("train_val", ["--config", str(cfg), "--opts", "trainer.max_epochs=2"]) == 2
    assert main("train_val", ["--config", str(cfg), "--data_root",
                              str(tmp_path / "no_such_data")]) == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text(cfg.read_text().replace("num_train: 6", "num_train: 0"))
    assert main("train_val", ["--config", str(broken), "--class_name", "bolt"]) == 2
    assert tree(runs) == before
    # a mistyped --work_dir for --resume/--evaluate is an error that creates nothing
    for flag in ("--resume", "--evaluate"):
        assert main("train_val", ["--work_dir", str(tmp_path / "typo"), flag]) == 2
        assert "does not exist" in capsys.readouterr().err
        assert not (tmp_path / "typo").exists()
    # a folder without a checkpoint (an old failed start) is never "the newest run"
    (runs / "99999999-999999").mkdir()
    (runs / "99999999-999999" / "log.txt").write_text("")
    assert main("train_val", ["--config", str(cfg), "--evaluate"]) == 0
    assert (good[0] / "evaluations").is_dir()


class Evil:
    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.mark))}",)


def test_checkpoints_that_would_run_code_are_refused(runs, tmp_path, capsys):
    from dualmem.tools import predict

    mark = tmp_path / "PWNED"
    run = tmp_path / "run"
    shutil.copytree(runs["single"], run, ignore=shutil.ignore_patterns("evaluations"))
    # what the framework writes opens with weights_only=True
    state = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    state["evil"] = Evil(mark)
    torch.save(state, run / "checkpoints" / "last.pth")
    assert not mark.exists()
    for argv in (["--work_dir", str(run), "--evaluate"], ["--work_dir", str(run), "--resume"]):
        assert main("train_val", argv) == 2
        err = capsys.readouterr().err
        assert "refused" in err and "--trust_checkpoint" in err
    img = next((runs["tmp"] / "data").rglob("*.png"))
    assert predict.main(["--checkpoint", str(run / "checkpoints" / "last.pth"), "--input",
                         str(img), "--output", str(tmp_path / "pred"), "--device", "cpu"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not mark.exists()  # nothing from the file ran


def test_per_class_sweep_resumes_and_evaluates_from_its_folder(tmp_path):
    cfg = write_cfg(tmp_path / "cfg.yaml", epochs=1)
    work = tmp_path / "sweep"
    assert main("train_per_class", ["--config", str(cfg), "--work_dir", str(work)]) == 0
    res = json.loads((work / "results.json").read_text())
    assert main("train_per_class", ["--work_dir", str(work), "--evaluate"]) == 0
    again = json.loads((newest_evaluation(work) / "results.json").read_text())
    assert_same_metrics(res, again)
    assert again["protocol"]["setting"] == "per-class"
    # each class folder is a run of its own
    assert main("train_val", ["--work_dir", str(work / "disc"), "--evaluate"]) == 0
    one = json.loads((newest_evaluation(work / "disc") / "results.json").read_text())
    assert list(one["per_class"]) == ["disc"] and one["protocol"]["setting"] == "single-class"


def test_per_class_resume_with_a_change_applies_it_to_every_class_and_keeps_their_history(
        tmp_path, capsys):
    cfg = write_cfg(tmp_path / "cfg.yaml", epochs=1)
    work = tmp_path / "sweep"
    assert main("train_per_class", ["--config", str(cfg), "--work_dir", str(work)]) == 0
    assert main("train_per_class", ["--work_dir", str(work), "--resume"]) == 0
    assert capsys.readouterr().out.count("kept finished results") == 2  # nothing to change
    for epochs in (2, 3):  # finished classes are extended, not kept at the old length
        assert main("train_per_class", ["--work_dir", str(work), "--resume", "--override",
                                        "--opts", f"trainer.max_epoch={epochs}"]) == 0
        res = json.loads((work / "results.json").read_text())
        assert res["epoch"] == {"disc": epochs, "weave": epochs}
        assert f"trainer.max_epoch: {epochs - 1} -> {epochs}" in " ".join(
            res["protocol"]["overrides"])
    for cls in ("disc", "weave"):
        assert torch.load(work / cls / "checkpoints" / "last.pth",
                          weights_only=True)["epoch"] == 3
        history = json.loads((work / cls / "run.json").read_text())["history"]
        assert [(c["old"], c["new"]) for h in history for c in h["changes"]
                if c["key"] == "trainer.max_epoch"] == [(1, 2), (2, 3)]


README_EVALUATE = re.compile(r"python (tools/\w+\.py) ([^\n#]*--(?:evaluate|resume)[^\n#]*)")


def test_every_readme_evaluate_command_runs_as_written(runs):
    """Each ``--evaluate``/``--resume`` command of README.md, docs/ and the experiment READMEs,
    with RUN standing for a real run folder."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "experiments").rglob("*README*.md"))]
    commands = [(path, m.group(1), m.group(2)) for path in texts
                for m in README_EVALUATE.finditer(path.read_text(encoding="utf-8"))]
    assert len(commands) >= 4
    for path, tool, argv in commands:
        args = shlex.split(re.sub(r"\[[^\]]*\]", "", argv.replace("\\", " ")))
        assert "RUN" in args, f"{path.name}: {argv} does not use the short form --work_dir RUN"
        args = [str(runs["unified"]) if a == "RUN" else a for a in args]
        name = tool.split("/")[-1][:-3]
        if "--resume" in args:
            continue  # a finished run: --resume has nothing left to do (covered above)
        assert main(name, args) == 0, f"{path.name}: {argv}"


def test_results_report_the_final_epoch_and_label_the_best_one(tmp_path):
    cfg = write_cfg(tmp_path / "cfg.yaml", epochs=3)  # evaluated after every epoch
    run = tmp_path / "run"
    assert main("train_val", ["--config", str(cfg), "--work_dir", str(run)]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["epoch"] == 3 and res["protocol"]["reported"] == "final epoch (3)"
    best = res["best_on_test_set"]
    assert 1 <= best["epoch"] <= 3 and "selected on the test set" in best["note"]
    assert set(best["mean"]) == set(res["mean"])
    # the reported figures are those of the final weights (last.pth), not best.pth's
    assert main("train_val", ["--work_dir", str(run), "--evaluate"]) == 0
    assert_same_metrics(res, json.loads((newest_evaluation(run) / "results.json").read_text()))
    assert torch.load(run / "checkpoints" / "best.pth", weights_only=True)["epoch"] == \
        best["epoch"]
