"""The run folder holds the code it ran: the commit, the uncommitted changes as a patch that
rebuilds the working tree, the package versions, and a resume under other code is recorded."""
import json
import shutil
import subprocess

import pytest
import torch
import yaml

from conftest import ROOT, synthetic_dataset, tiny_net
from utils import code_state


def git(cwd, *args):
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A small git checkout standing in for DualMem's."""
    if shutil.which("git") is None:
        pytest.fail("git is needed to record the code a run used")
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("x = 1\n")
    (src / ".gitignore").write_text("runs/\n")
    git(src, "init", "-q")
    git(src, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    git(src, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "one")
    monkeypatch.setattr(code_state, "REPO_ROOT", src)
    return src


def test_clean_tree_is_its_commit_and_has_no_diff(repo):
    head = git(repo, "rev-parse", "--short", "HEAD").strip()
    (repo / "runs").mkdir()
    (repo / "runs" / "out.txt").write_text("ignored output\n")
    assert code_state.code_version() == head and code_state.code_diff() is None


def test_the_diff_rebuilds_the_working_tree_exactly(repo, tmp_path):
    (repo / "pkg" / "a.py").write_text("x = 2  # changed\n")
    (repo / "pkg" / "new.py").write_text("y = 3\n")  # untracked, not ignored
    (repo / "big.bin").write_bytes(b"\0" * 64)
    version = code_state.code_version()
    assert code_state.is_dirty(version) and version.startswith(
        git(repo, "rev-parse", "--short", "HEAD").strip() + "+dirty.")
    diff = code_state.code_diff(max_new_file=32)
    assert "# untracked big.bin: 64 bytes, not included" in diff
    patch = tmp_path / "code.diff"
    patch.write_text(diff)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "apply", str(patch))
    assert (clone / "pkg" / "a.py").read_text() == "x = 2  # changed\n"
    assert (clone / "pkg" / "new.py").read_text() == "y = 3\n"
    (repo / "pkg" / "new.py").write_text("y = 4\n")  # other changes: another version
    assert code_state.code_version() != version


def test_state_changes_compare_with_the_latest_recorded(monkeypatch):
    monkeypatch.setattr(code_state, "code_version", lambda: "bbb")
    monkeypatch.setattr(code_state, "environment", lambda: {"torch": "2.1", "numpy": "2.0"})
    record = {"dualmem_version": "aaa", "environment": {"torch": "2.0", "numpy": "2.0"},
              "history": [{"changes": [{"key": "environment.torch", "old": "2.0",
                                        "new": "2.1"}]}]}
    assert code_state.state_changes(record) == [("dualmem_version", "aaa", "bbb")]
    record["history"].append({"changes": [{"key": "dualmem_version", "old": "aaa",
                                           "new": "bbb"}]})
    assert code_state.state_changes(record) == []
    assert code_state.state_changes({}) == []  # a record from before versions were kept


@pytest.mark.slow
def test_run_keeps_its_diff_and_a_resume_under_other_code_is_in_the_protocol(tmp_path,
                                                                             monkeypatch):
    from tools import train_val

    cfg = {"_base_": str(ROOT / "configs" / "runtime.yaml"), "random_seed": 7,
           "dataset": synthetic_dataset(tmp_path / "data", seed=3),
           "trainer": {"max_epoch": 1, "val_freq_epoch": 1,
                       "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
           "net": tiny_net()}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "run"
    monkeypatch.setattr(code_state, "code_version", lambda: "aaa1111+dirty.0123abcd")
    monkeypatch.setattr(code_state, "code_diff", lambda: "diff --git a/x b/x\n")
    argv = ["--work_dir", str(work), "--no_progress", "--device", "cpu"]
    assert train_val.main(["--config", str(path), *argv]) == 0
    record = json.loads((work / "run.json").read_text())
    assert record["dualmem_version"] == "aaa1111+dirty.0123abcd"
    assert record["code_diff"] == "code.diff"
    assert (work / "code.diff").read_text() == "diff --git a/x b/x\n"
    assert record["environment"]["torch"] == torch.__version__

    # resumed (extended to 2 epochs) under another commit and another torch
    monkeypatch.setattr(code_state, "code_version", lambda: "bbb2222")
    real_env = code_state.environment
    monkeypatch.setattr(code_state, "environment", lambda: {**real_env(), "torch": "9.9"})
    assert train_val.main([*argv, "--resume", "--override", "--opts",
                           "trainer.max_epoch=2"]) == 0
    record = json.loads((work / "run.json").read_text())
    changes = {c["key"]: (c["old"], c["new"]) for c in record["history"][-1]["changes"]}
    assert changes["dualmem_version"] == ("aaa1111+dirty.0123abcd", "bbb2222")
    assert changes["environment.torch"] == (torch.__version__, "9.9")
    assert "code_diffs" not in record  # a clean tree: the commit says it all
    overrides = json.loads((work / "results.json").read_text())["protocol"]["overrides"]
    assert any(o.startswith("dualmem_version: 'aaa1111+dirty.0123abcd' -> 'bbb2222'")
               for o in overrides)
