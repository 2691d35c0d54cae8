"""DDP on CPU (gloo), two processes: training runs, and distributed evaluation equals a
single-process evaluation of the same checkpoint with every test image counted once."""
import csv
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from test_engine import make_config

pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n):
    """n distinct free ports: one rendezvous per command, as torchrun gives each launch."""
    ports = set()
    while len(ports) < n:
        ports.add(_free_port())
    return sorted(ports)


def _spawn(*args, deadline_s=600):
    """mp.spawn with a deadline: a hung rendezvous fails the test in minutes instead of
    waiting for the process group's 30-minute timeout."""
    ctx = mp.start_processes(_worker, args=args, nprocs=2, join=False, start_method="spawn")
    start = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - start > deadline_s:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"two-process run did not finish in {deadline_s} s")


def _worker(rank, world, ports, argv_list, codes_dir, tool="train_val"):
    """Each command gets its own MASTER_PORT: re-using one within a process races with rank 0
    still closing the previous store (a rank can reach the old store and be reset)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1"})
    torch.set_num_threads(1)
    import importlib

    module = importlib.import_module(f"dualmem.tools.{tool}")
    for i, argv in enumerate(argv_list):
        os.environ["MASTER_PORT"] = str(ports[i])
        code = module.main(argv)
        with open(os.path.join(codes_dir, f"{rank}_{i}"), "w") as f:
            f.write(str(code))
        if code:
            return


def test_two_process_training_and_evaluation_match_single_process(tmp_path):
    cfg = make_config(tmp_path, epochs=2, val_freq=1)
    ddp = tmp_path / "ddp"
    common = ["--config", str(cfg), "--no_progress", "--device", "cpu"]
    runs = [common + ["--work_dir", str(ddp)],
            common + ["--work_dir", str(ddp), "--evaluate"]]
    codes = tmp_path / "codes"
    codes.mkdir()
    _spawn(2, _free_ports(len(runs)), runs, str(codes))
    assert sorted(p.read_text() for p in codes.iterdir()) == ["0"] * 4
    # the two-process evaluation went to its own folder; a single process evaluates the
    # same checkpoint into another one
    ddp_eval = sorted((ddp / "evaluations").iterdir())
    assert len(ddp_eval) == 1
    ddp_results = json.loads((ddp_eval[0] / "results.json").read_text())

    from dualmem.tools import train_val

    assert train_val.main(["--work_dir", str(ddp), "--evaluate", "--checkpoint",
                           str(ddp / "checkpoints" / "last.pth"), "--no_progress",
                           "--device", "cpu"]) == 0
    single = sorted((ddp / "evaluations").iterdir())[-1]
    assert single != ddp_eval[0]
    single_results = json.loads((single / "results.json").read_text())
    for cls, values in single_results["per_class"].items():
        for key, value in values.items():
            if value is not None:
                assert ddp_results["per_class"][cls][key] == pytest.approx(value, abs=1e-6)

    with open(ddp_eval[0] / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    with open(single / "scores.csv") as f:
        expected = list(csv.DictReader(f))
    files = [r["file"] for r in rows]
    assert len(files) == len(set(files)) == len(expected)  # each test image exactly once


def test_train_unified_under_two_processes_writes_one_run_with_the_same_metrics(tmp_path):
    """torchrun with train_unified.py: one run folder (rank 0 names it, every rank uses it),
    one log, and the two-process evaluation equals a single-process one of the checkpoint."""
    from dualmem.tools import train_unified

    cfg = make_config(tmp_path, epochs=2, val_freq=2)
    common = ["--config", str(cfg), "--no_progress", "--device", "cpu"]
    codes = tmp_path / "codes"
    codes.mkdir()
    _spawn(2, _free_ports(2), [common, common + ["--evaluate"]], str(codes), "train_unified")
    assert sorted(p.read_text() for p in codes.iterdir()) == ["0"] * 4
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # not one folder per process
    run = runs[0]
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    log = (run / "log.txt").read_text()
    assert log.count("epoch 2/2 loss") == 1  # rank 0 alone writes
    two = sorted((run / "evaluations").iterdir())
    assert len(two) == 1
    assert train_unified.main(["--work_dir", str(run), "--evaluate", "--no_progress",
                               "--device", "cpu"]) == 0
    one = sorted((run / "evaluations").iterdir())[-1]
    a = json.loads((two[0] / "results.json").read_text())
    b = json.loads((one / "results.json").read_text())
    for cls, values in b["per_class"].items():
        for key, value in values.items():
            if value is not None:
                assert a["per_class"][cls][key] == pytest.approx(value, abs=1e-6), (cls, key)
