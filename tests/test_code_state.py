"""The run folder holds the code it ran: the commit, the uncommitted changes as a patch that
rebuilds the working tree, the package versions, and a resume under other code is recorded."""
import json
import shutil
import subprocess

import pytest
import torch
import yaml

from conftest import ROOT, synthetic_dataset, tiny_net
from dualmem.utils import code_state


def git(cwd, *args):
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True).stdout


def commit_all(folder):
    """A new repository at ``folder`` with everything in it committed once."""
    git(folder, "init", "-q")
    git(folder, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    git(folder, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "one")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A small git checkout standing in for DualMem's."""
    if shutil.which("git") is None:
        pytest.fail("git is needed to record the code a run used")
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("x = 1\n")
    (src / ".gitignore").write_text("runs/\n")
    commit_all(src)
    monkeypatch.setattr(code_state, "REPO_ROOT", src)
    return src


def test_clean_tree_is_its_commit_and_has_no_diff(repo):
    head = git(repo, "rev-parse", "--short", "HEAD").strip()
    (repo / "runs").mkdir()
    (repo / "runs" / "out.txt").write_text("ignored output\n")
    snap = code_state.snapshot()
    assert snap.version == head and snap.diff is None and snap.save(repo) is None


def test_the_diff_rebuilds_the_working_tree_exactly(repo, tmp_path, monkeypatch):
    (repo / "pkg" / "a.py").write_text("x = 2  # changed\n")
    (repo / "pkg" / "new.py").write_text("y = 3\n")  # untracked, not ignored
    (repo / "pkg" / "blob.bin").write_bytes(bytes(range(256)))  # binary, not UTF-8
    (repo / "big.txt").write_text("z\n" * 200)
    (repo / "old_run").mkdir()  # a run folder inside the checkout is not code
    (repo / "old_run" / "run.json").write_text("{}")
    (repo / "old_run" / "log.txt").write_text("log\n")
    (repo / "this_run").mkdir()
    (repo / "this_run" / "log.txt").write_text("log\n")
    monkeypatch.setattr(code_state, "MAX_NEW_BYTES", 300)
    snap = code_state.snapshot(exclude=repo / "this_run")
    head = git(repo, "rev-parse", "--short", "HEAD").strip()
    assert snap.dirty and snap.version.startswith(head + "+dirty.")
    diff = snap.diff.decode("utf-8", "replace")
    assert "# untracked, not included (over 200 files or 300 bytes): big.txt (400 bytes)" in diff
    assert "log.txt" not in diff
    assert snap.save(tmp_path) == "code.diff"
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "apply", str(tmp_path / "code.diff"))
    for name in ("pkg/a.py", "pkg/new.py", "pkg/blob.bin"):
        assert (clone / name).read_bytes() == (repo / name).read_bytes(), name
    (repo / "pkg" / "new.py").write_text("y = 4\n")  # other changes: another version
    assert code_state.snapshot(exclude=repo / "this_run").version != snap.version


def test_unreadable_changes_are_never_called_clean(repo, monkeypatch):
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    real = code_state._git
    monkeypatch.setattr(code_state, "_git", lambda *a: (_ for _ in ()).throw(OSError("x"))
                        if a[0] == "diff" else real(*a))
    assert code_state.snapshot().version.endswith("+dirty.unknown")


def test_state_changes_compare_with_the_latest_recorded():
    env = {"torch": "2.1", "numpy": "2.0"}
    record = {"dualmem_version": "aaa", "environment": {"torch": "2.0", "numpy": "2.0"},
              "history": [{"changes": [{"key": "environment.torch", "old": "2.0",
                                        "new": "2.1"}]}]}
    assert code_state.state_changes(record, "bbb", env) == [("dualmem_version", "aaa", "bbb")]
    record["history"].append({"changes": [{"key": "dualmem_version", "old": "aaa",
                                           "new": "bbb"}]})
    assert code_state.state_changes(record, "bbb", env) == []
    assert code_state.state_changes({}, "bbb", env) == []  # from before versions were kept


def test_environment_is_plain_strings():
    env = code_state.environment()
    assert env["torch"] == str(torch.__version__) and type(env["torch"]) is str
    assert all(v is None or type(v) is str for v in env.values())


@pytest.mark.slow
def test_run_keeps_its_diff_and_a_resume_under_other_code_is_in_the_protocol(tmp_path,
                                                                             monkeypatch):
    from dualmem.tools import train_val

    cfg = {"_base_": str(ROOT / "configs" / "runtime.yaml"), "random_seed": 7,
           "dataset": synthetic_dataset(tmp_path / "data", seed=3),
           "trainer": {"max_epoch": 1, "val_freq_epoch": 1,
                       "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
           "net": tiny_net()}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "run"
    monkeypatch.setattr(code_state, "snapshot", lambda exclude=None: code_state.Snapshot(
        "aaa1111+dirty.0123abcd", b"diff --git a/x b/x\n"))
    argv = ["--work_dir", str(work), "--no_progress", "--device", "cpu"]
    assert train_val.main(["--config", str(path), *argv]) == 0
    record = json.loads((work / "run.json").read_text())
    assert record["dualmem_version"] == "aaa1111+dirty.0123abcd"
    assert record["code_diff"] == "code.diff"
    assert (work / "code.diff").read_text() == "diff --git a/x b/x\n"
    assert record["environment"]["torch"] == torch.__version__
    assert torch.load(work / "checkpoints" / "last.pth", weights_only=True)["run"][
        "dualmem_version"] == "aaa1111+dirty.0123abcd"  # the record loads as plain data

    # resumed (extended to 2 epochs) under another commit and another torch
    monkeypatch.setattr(code_state, "snapshot", lambda exclude=None: code_state.Snapshot(
        "bbb2222"))
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
    # an evaluation names the code that scored it
    assert train_val.main([*argv, "--evaluate"]) == 0
    out = sorted((work / "evaluations").iterdir())[-1]
    assert json.loads((out / "results.json").read_text())["evaluated_with"] == {
        "dualmem_version": "bbb2222", "code_diff": None}


def test_checkout_inside_a_monorepo_gives_paths_from_the_checkout(tmp_path, monkeypatch):
    """The outer repository tracks the checkout as a folder: the patch must apply inside the
    checkout (paths relative to it), not at the outer root (#25 item 15)."""
    outer = tmp_path / "mono"
    src = outer / "third_party" / "dualmem"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("x = 1\n")
    (outer / "other.txt").write_text("outside\n")
    commit_all(outer)
    monkeypatch.setattr(code_state, "REPO_ROOT", src)
    (src / "pkg" / "a.py").write_text("x = 2\n")
    (src / "pkg" / "new.py").write_text("y = 3\n")
    (outer / "other.txt").write_text("changed outside the checkout\n")
    snap = code_state.snapshot()
    diff = snap.diff.decode()
    assert "a/pkg/a.py" in diff and "b/pkg/new.py" in diff and "other.txt" not in diff
    assert "third_party" not in diff
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    (copy / "pkg" / "a.py").write_text("x = 1\n")
    (copy / "pkg" / "new.py").unlink()
    git(copy, "init", "-q")
    subprocess.run(["git", "-C", str(copy), "apply", "-"], input=snap.diff, check=True)
    assert (copy / "pkg" / "a.py").read_text() == "x = 2\n"
    assert (copy / "pkg" / "new.py").read_text() == "y = 3\n"


def test_checkout_untracked_inside_an_unrelated_repo_is_not_given_its_commit(tmp_path,
                                                                             monkeypatch):
    outer = tmp_path / "home"
    outer.mkdir()
    (outer / "dotfile").write_text("x\n")
    commit_all(outer)
    src = outer / "dualmem"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(code_state, "REPO_ROOT", src)
    assert code_state.snapshot().version == "unknown"


def test_an_edit_past_the_untracked_caps_changes_the_version(repo, monkeypatch):
    monkeypatch.setattr(code_state, "MAX_NEW_FILES", 2)
    for i in range(4):
        (repo / f"n{i}.py").write_text(f"v = {i}\n")
    before = code_state.snapshot()
    (repo / "n3.py").write_text("v = 9\n")  # same size: only the content differs
    after = code_state.snapshot()
    assert "n3.py" not in after.diff.decode().split("# untracked")[0]  # not in the patch
    assert after.version != before.version
