"""Interrupted and failing runs lose nothing: signals, NaN losses, locks, corrupt checkpoints."""
import os
import signal

import pytest
import torch

from test_engine import make_config, run
from dualmem.tools import train_val
from dualmem.utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dualmem.utils.engine import Trainer
from dualmem.utils.workdir_lock import WorkDirBusyError, WorkDirLock


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_epoch_checkpoints_and_resume_is_exact(tmp_path, monkeypatch, sig):
    cfg = make_config(tmp_path, epochs=3, val_freq=3)
    full, part = tmp_path / "full", tmp_path / "part"
    # whatever the handlers were (a shell's background job starts with SIGINT ignored)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    run(["--config", str(cfg), "--work_dir", str(full)])

    original = Trainer.to_device
    calls = {"n": 0}

    def send_signal_on_fifth_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2 (3 batches an epoch), second step
            os.kill(os.getpid(), sig)
        return original(self, batch)

    monkeypatch.setattr(Trainer, "to_device", send_signal_on_fifth_batch)
    code = train_val.main(["--config", str(cfg), "--work_dir", str(part), "--no_progress",
                           "--device", "cpu"])
    assert code == 128 + sig
    state = torch.load(part / "checkpoints" / "last.pth", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    monkeypatch.setattr(Trainer, "to_device", original)
    run(["--config", str(cfg), "--work_dir", str(part), "--resume"])
    a, b = weights(full / "checkpoints" / "last.pth"), weights(part / "checkpoints" / "last.pth")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good(tmp_path, monkeypatch, capsys):
    cfg = make_config(tmp_path, epochs=3, val_freq=3)
    work = tmp_path / "nan"
    from dualmem.models.losses import FeatureMSELoss

    original = FeatureMSELoss.forward
    calls = {"n": 0}

    def nan_on_step_5(self, outputs):
        calls["n"] += 1
        loss = original(self, outputs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(FeatureMSELoss, "forward", nan_on_step_5)
    code = train_val.main(["--config", str(cfg), "--work_dir", str(work), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "epoch 2, step 2" in err and "nan" in err
    assert torch.load(work / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 1

    calls["n"] = 0
    code = train_val.main(["--config", str(cfg), "--work_dir", str(tmp_path / "skip"),
                           "--no_progress", "--opts", "trainer.on_nonfinite=skip"])
    assert code == 0
    final = weights(tmp_path / "skip" / "checkpoints" / "last.pth")
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def test_two_runs_on_one_work_dir_are_refused(tmp_path):
    lock = WorkDirLock(tmp_path).acquire()
    with pytest.raises(WorkDirBusyError, match=f"pid {os.getpid()}"):
        WorkDirLock(tmp_path).acquire()
    lock.release()
    WorkDirLock(tmp_path).acquire().release()  # free again once released


def test_atomic_checkpoint_survives_a_crash_while_writing(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "best.pth"
    save_checkpoint({"model": {"w": torch.ones(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pth")


def test_a_failed_build_releases_the_work_dir(tmp_path):
    from test_engine import make_config
    from dualmem.utils.config import load_config

    cfg = load_config(make_config(tmp_path), ["net.1.type=models.necks.Nope"])
    with pytest.raises(ValueError, match="Nope"):
        Trainer(cfg, tmp_path / "w", torch.device("cpu"), progress=False)
    WorkDirLock(tmp_path / "w").acquire().release()  # not left locked
