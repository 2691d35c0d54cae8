"""No interrupt or override loses results (issue #25, items 5-9 and 13): a stop during the
final evaluation, Ctrl-C in a sweep, a re-run into a sweep's folder, a new run into a run's
folder, two override commands at once, per-class sweeps whose classes went different ways."""
import json
import multiprocessing
import shutil
import signal

import pytest
import torch
import yaml

from conftest import ROOT, synthetic_dataset, tiny_net
from dualmem.tools import sweep, train_per_class, train_val
from dualmem.utils.engine import Trainer

CPU = ["--no_progress", "--device", "cpu", "--threads", "1"]


def write_cfg(tmp_path, epochs=1, classes=("disc", "weave")):
    cfg = {"_base_": str(ROOT / "configs" / "runtime.yaml"), "random_seed": 7,
           "dataset": synthetic_dataset(tmp_path / "data", seed=3, classes=classes),
           "trainer": {"max_epoch": epochs, "val_freq_epoch": 1,
                       "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
           "net": tiny_net(hidden_dim=16)}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def epoch_of(run):
    return torch.load(run / "checkpoints" / "last.pth", weights_only=True)["epoch"]


def history(run, key):
    return [(c["old"], c["new"]) for h in json.loads((run / "run.json").read_text())["history"]
            for c in h["changes"] if c["key"] == key]


def signal_in_evaluation(monkeypatch, then_raise=False, times=1):
    """SIGINT arrives while the test set is scored (the first ``times`` evaluations); with
    ``then_raise`` a second one stops it at once."""
    original, calls = Trainer.evaluate_now, {"n": 0}

    def evaluate_now(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            self._on_signal(signal.SIGINT, None)
            if then_raise:
                raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate_now", evaluate_now)
    return original


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 1-epoch run, copied by the tests that change it."""
    tmp = tmp_path_factory.mktemp("trained")
    run = tmp / "run"
    assert train_val.main(["--config", str(write_cfg(tmp)), "--work_dir", str(run)] + CPU) == 0
    return run


# --- item 5: the final evaluation of train_val --------------------------------------------
@pytest.mark.slow
def test_sigint_during_the_final_evaluation_writes_its_results(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    signal_in_evaluation(monkeypatch)
    code = train_val.main(["--config", str(write_cfg(tmp_path)), "--work_dir", str(run)] + CPU)
    err = capsys.readouterr().err
    assert code == 130 and "during the evaluation after epoch 1: it finished" in err
    assert "epoch 2" not in err
    results = json.loads((run / "results.json").read_text())
    assert results["epoch"] == 1 and results["protocol"]["epochs"] == 1
    state = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and not state["evaluation_pending"]


@pytest.mark.slow
def test_a_hard_stop_during_the_final_evaluation_is_finished_by_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = signal_in_evaluation(monkeypatch, then_raise=True)
    with pytest.raises(KeyboardInterrupt):
        train_val.main(["--config", str(write_cfg(tmp_path)), "--work_dir", str(run)] + CPU)
    assert not (run / "results.json").exists()
    state = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["evaluation_pending"]  # the trained epoch is kept
    monkeypatch.setattr(Trainer, "evaluate_now", original)
    assert train_val.main(["--work_dir", str(run), "--resume"] + CPU) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["epoch"] == 1 and set(results["per_class"]) == {"disc", "weave"}
    assert "evaluation after epoch 1 did not finish" in (run / "log.txt").read_text()
    # a finished checkpoint without results (as the old code left it): resume evaluates
    (run / "results.json").unlink()
    assert train_val.main(["--work_dir", str(run), "--resume"] + CPU) == 0
    assert json.loads((run / "results.json").read_text())["per_class"] == results["per_class"]


# --- item 6: the same in train_per_class ---------------------------------------------------
@pytest.mark.slow
def test_per_class_sigint_in_a_final_evaluation_then_resume_trains_the_rest(
        tmp_path, monkeypatch, capsys):
    work = tmp_path / "pc"
    original = signal_in_evaluation(monkeypatch)
    argv = ["--config", str(write_cfg(tmp_path)), "--work_dir", str(work)] + CPU
    assert train_per_class.main(argv) == 130
    assert (work / "disc" / "results.json").is_file()  # its evaluation finished: kept
    assert not (work / "weave").exists()  # the stop stopped the sweep
    mtime = (work / "disc" / "checkpoints" / "last.pth").stat().st_mtime_ns
    monkeypatch.setattr(Trainer, "evaluate_now", original)
    capsys.readouterr()
    assert train_per_class.main(["--work_dir", str(work), "--resume"] + CPU) == 0
    assert "produced no evaluation" not in capsys.readouterr().err
    res = json.loads((work / "results.json").read_text())
    assert set(res["per_class"]) == {"disc", "weave"}
    assert (work / "disc" / "checkpoints" / "last.pth").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_per_class_hard_stop_in_a_final_evaluation_then_resume_evaluates_it(
        tmp_path, monkeypatch):
    work = tmp_path / "pc"
    original = signal_in_evaluation(monkeypatch, then_raise=True)
    argv = ["--config", str(write_cfg(tmp_path)), "--work_dir", str(work)] + CPU
    with pytest.raises(KeyboardInterrupt):
        train_per_class.main(argv)
    monkeypatch.setattr(Trainer, "evaluate_now", original)
    assert train_per_class.main(["--work_dir", str(work), "--resume"] + CPU) == 0
    res = json.loads((work / "results.json").read_text())
    assert res["epoch"] == {"disc": 1, "weave": 1}
    # disc's trained epoch was kept and only its evaluation ran
    assert "evaluation after epoch 1 did not finish" in (work / "disc" / "log.txt").read_text()


# --- item 7: Ctrl-C in a sweep, a sweep run again into its folder --------------------------
def sweep_argv(cfg, work, values="1e-3,2e-3"):
    return ["--config", str(cfg), "--work_dir", str(work), "--grid",
            f"trainer.optimizer.kwargs.lr={values}"] + CPU


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_and_the_same_command_resumes_it(tmp_path, monkeypatch):
    cfg, work = write_cfg(tmp_path, classes=("disc",)), tmp_path / "sweep"
    original, calls = Trainer.to_device, {"n": 0}

    def sigint_on_first_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == 1:
            self._on_signal(signal.SIGINT, None)
        return original(self, batch)

    monkeypatch.setattr(Trainer, "to_device", sigint_on_first_batch)
    assert sweep.main(sweep_argv(cfg, work)) == 130
    cells = json.loads((work / "sweep.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["interrupted", "pending"]
    assert not (work / cells[1]["name"]).exists()  # the next cell never started
    assert not list(work.rglob("error.txt"))

    monkeypatch.setattr(Trainer, "to_device", original)
    assert sweep.main(sweep_argv(cfg, work)) == 0  # the same command continues it
    first = work / cells[0]["name"]
    assert "resumed from" in (first / "log.txt").read_text()
    cells = json.loads((work / "sweep.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["ok", "ok"]
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()
              and p.name in ("last.pth", "results.json", "run.json")}

    # run again once finished: everything kept, nothing marked failed
    assert sweep.main(sweep_argv(cfg, work)) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert not list(work.rglob("error.txt"))
    summary = (work / "sweep.json").read_text()
    assert [c["status"] for c in json.loads(summary)["cells"]] == ["ok", "ok"]

    # another command into that folder is refused and changes nothing
    assert sweep.main(sweep_argv(cfg, work, values="5e-3")) == 2
    assert (work / "sweep.json").read_text() == summary
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_sweep_into_a_folder_that_is_not_its_own_is_refused(tmp_path, capsys):
    cfg, work = write_cfg(tmp_path), tmp_path / "other"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    assert sweep.main(sweep_argv(cfg, work)) == 2
    assert "holds no sweep.json" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


# --- item 8: a new run into a folder holding a run record ----------------------------------
@pytest.mark.parametrize("held", ["run.json", "results.json", "sweep.json"])
def test_a_new_run_into_a_folder_holding_a_record_is_refused(tmp_path, capsys, held):
    folder = tmp_path / "per_class_run"
    folder.mkdir()
    record = json.dumps({"tool": "train_per_class", "history": []})
    (folder / held).write_text(record)
    code = train_val.main(["--config", str(write_cfg(tmp_path)), "--work_dir", str(folder)]
                          + CPU)
    assert code == 2 and f"already holds a run ({held})" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == [held]
    assert (folder / held).read_text() == record


# --- item 9: two override commands on one run at once --------------------------------------
def _append_entries(folder, tag, n):
    from dualmem.utils.run_record import history_entry, update_record

    for i in range(n):
        update_record(folder, entries=[history_entry("evaluate", [(f"{tag}.{i}", 0, 1)])])


def test_concurrent_record_updates_keep_every_history_entry(tmp_path):
    from dualmem.utils.run_record import write_record

    write_record(tmp_path, {"tool": "train_val", "history": []})
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_entries, args=(tmp_path, f"p{k}", 15)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    keys = {c["key"] for h in json.loads((tmp_path / "run.json").read_text())["history"]
            for c in h["changes"]}
    assert len(keys) == 60


@pytest.mark.slow
def test_an_override_recorded_while_another_runs_keeps_both_entries(trained, tmp_path,
                                                                     monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    original, calls = Trainer.evaluate, {"n": 0}

    def evaluate(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # a second override command on the run, while this one scores
            assert train_val.main(["--work_dir", str(run), "--evaluate", "--override", "--opts",
                                   "dataset.test_batch_size=3"] + CPU) == 0
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    assert train_val.main(["--work_dir", str(run), "--evaluate", "--override", "--opts",
                           "dataset.test_batch_size=2"] + CPU) == 0
    assert [new for _, new in history(run, "dataset.test_batch_size")] == [3, 2]


# --- item 13: per-class sweeps whose classes went different ways; overrides; sweep tables --
@pytest.mark.slow
def test_an_evaluation_override_stays_in_that_evaluation(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert train_val.main(["--work_dir", str(run), "--evaluate", "--override", "--opts",
                           "dataset.test_batch_size=3"] + CPU) == 0
    first = sorted((run / "evaluations").iterdir())[-1]
    overrides = json.loads((first / "results.json").read_text())["protocol"]["overrides"]
    assert len(overrides) == 1 and overrides[0].startswith("dataset.test_batch_size: ")
    assert overrides[0].endswith("-> 3 (evaluation)")
    assert train_val.main(["--work_dir", str(run), "--evaluate"] + CPU) == 0
    later = [p for p in sorted((run / "evaluations").iterdir()) if p != first]
    protocol = json.loads((later[-1] / "results.json").read_text())["protocol"]
    assert "overrides" not in protocol, protocol.get("overrides")


@pytest.mark.slow
def test_per_class_protocol_and_overrides_follow_each_class(tmp_path, capsys):
    work = tmp_path / "pc"
    argv = ["--config", str(write_cfg(tmp_path)), "--work_dir", str(work)] + CPU
    assert train_per_class.main(argv) == 0
    # weave resumed alone to 3 epochs; the sweep's table then names each class's epochs
    assert train_val.main(["--work_dir", str(work / "weave"), "--resume", "--override",
                           "--opts", "trainer.max_epoch=3"] + CPU) == 0
    assert train_per_class.main(["--work_dir", str(work), "--resume"] + CPU) == 0
    res = json.loads((work / "results.json").read_text())
    assert res["epoch"] == {"disc": 1, "weave": 3}
    assert res["protocol"]["epochs"] == {"disc": 1, "weave": 3}
    assert [o.split(":")[:2] for o in res["protocol"]["overrides"]] == [
        ["weave", " trainer.max_epoch"]]  # weave's change, named as weave's

    # 2 epochs for the sweep would take weave back from 3: refused before disc trains
    capsys.readouterr()
    code = train_per_class.main(["--work_dir", str(work), "--resume", "--override", "--opts",
                                 "trainer.max_epoch=2"] + CPU)
    assert code == 2 and "weave has trained 3 epochs" in capsys.readouterr().err
    assert epoch_of(work / "disc") == 1
    assert yaml.safe_load((work / "config.yaml").read_text())["trainer"]["max_epoch"] == 1

    # 3 epochs: disc goes 1 -> 3, weave has nothing to change and is kept
    weave_mtime = (work / "weave" / "checkpoints" / "last.pth").stat().st_mtime_ns
    assert train_per_class.main(["--work_dir", str(work), "--resume", "--override", "--opts",
                                 "trainer.max_epoch=3"] + CPU) == 0
    assert epoch_of(work / "disc") == 3
    assert (work / "weave" / "checkpoints" / "last.pth").stat().st_mtime_ns == weave_mtime
    assert history(work / "disc", "trainer.max_epoch") == [(1, 3)]
    assert history(work / "weave", "trainer.max_epoch") == [(1, 3)]
    assert json.loads((work / "results.json").read_text())["protocol"]["epochs"] == 3


@pytest.mark.slow
def test_a_cell_resumed_alone_with_an_override_updates_the_sweep_table(tmp_path):
    cfg, work = write_cfg(tmp_path, classes=("disc",)), tmp_path / "sweep"
    assert sweep.main(sweep_argv(cfg, work, values="1e-3")) == 0
    cell = work / json.loads((work / "sweep.json").read_text())["cells"][0]["name"]
    assert train_val.main(["--work_dir", str(cell), "--resume", "--override", "--opts",
                           "trainer.max_epoch=2"] + CPU) == 0
    cells = json.loads((work / "sweep.json").read_text())["cells"]
    assert cells[0]["epoch"] == 2
    assert cells[0]["mean"] == json.loads((cell / "results.json").read_text())["mean"]
    row = next(line for line in (work / "sweep.md").read_text().splitlines()
               if line.startswith("| 1e-3"))
    assert row.rstrip(" |").endswith("2")
