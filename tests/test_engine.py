"""End-to-end engine runs on tiny synthetic data: results layout, exact resume, evaluate."""
import json

import pytest
import torch
import yaml

from conftest import ROOT, synthetic_dataset, tiny_net
from dualmem.tools import train_val

pytestmark = pytest.mark.slow


def make_config(tmp_path, epochs=3, val_freq=1, scheduler="StepLR"):
    cfg = {
        "_base_": str(ROOT / "configs" / "runtime.yaml"),
        "random_seed": 7,
        "dataset": synthetic_dataset(tmp_path / "data", seed=3),
        "trainer": {"max_epoch": epochs, "val_freq_epoch": val_freq,
                    "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}},
                    "lr_scheduler": {"type": scheduler, "kwargs": {"step_size": 2, "gamma": 0.5}
                                     if scheduler == "StepLR" else {}}},
        "net": tiny_net(),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(argv):
    assert train_val.main(argv + ["--no_progress", "--device", "cpu"]) == 0


def test_train_writes_the_contracted_layout_and_evaluate_reproduces(tmp_path):
    cfg = make_config(tmp_path, epochs=2)
    work = tmp_path / "run"
    run(["--config", str(cfg), "--work_dir", str(work)])
    for name in ("config.yaml", "log.txt", "results.json", "results.md",
                 "checkpoints/last.pth", "checkpoints/best.pth"):
        assert (work / name).is_file(), name
    assert any((work / "events").iterdir())
    results = json.loads((work / "results.json").read_text())
    assert set(results["protocol"]) >= {"dataset", "classes", "setting", "input_size", "epochs",
                                        "seed", "image_score", "backbone"}
    assert results["protocol"]["classes"] == ["disc", "weave"]
    assert set(results["per_class"]) == {"disc", "weave"}
    for values in [*results["per_class"].values(), results["mean"]]:
        for key in ("image_auroc", "pixel_auroc"):
            assert 0.0 <= values[key] <= 1.0
    mean = sum(results["per_class"][c]["pixel_auroc"] for c in ("disc", "weave")) / 2
    assert results["mean"]["pixel_auroc"] == pytest.approx(mean, abs=1e-12)
    md = (work / "results.md").read_text()
    assert "protocol:" in md and "| mean" in md
    saved = yaml.safe_load((work / "config.yaml").read_text())
    assert saved["trainer"]["max_epoch"] == 2 and saved["net"][2]["kwargs"]["hidden_dim"] == 32

    best = results
    run(["--config", str(cfg), "--work_dir", str(work), "--evaluate"])
    assert json.loads((work / "results.json").read_text()) == best  # never rewritten
    again = json.loads((sorted((work / "evaluations").iterdir())[-1] /
                        "results.json").read_text())
    for cls in best["per_class"]:
        for key, value in best["per_class"][cls].items():
            if value is not None:
                assert again["per_class"][cls][key] == pytest.approx(value, abs=1e-6)


def test_class_name_restricts_to_one_class(tmp_path):
    cfg = make_config(tmp_path, epochs=1)
    work = tmp_path / "one"
    run(["--config", str(cfg), "--work_dir", str(work), "--class_name", "weave"])
    results = json.loads((work / "results.json").read_text())
    assert list(results["per_class"]) == ["weave"]
    assert results["protocol"]["setting"] == "single-class"

def test_protocol_names_method_config_opts_and_departures_from_the_run(tmp_path):
    base = make_config(tmp_path, epochs=2)
    cfg = yaml.safe_load(base.read_text())
    cfg["departures"] = {"schedule": "2 epochs (paper 1000)", "backbone": "resnet18 (paper B4)"}
    base.write_text(yaml.safe_dump(cfg))
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {base}\ndepartures:\n  backbone: null\n")
    work = tmp_path / "run"
    run(["--config", str(child), "--work_dir", str(work), "--opts", "trainer.max_epoch=1"])
    trained = json.loads((work / "results.json").read_text())["protocol"]
    assert trained["method"] == "UniAD" and trained["config"] == str(child)
    assert trained["opts"] == ["trainer.max_epoch=1"] and trained["epochs"] == 1
    assert trained["departures"] == {"schedule": "2 epochs (paper 1000)"}  # null: dropped
    md = (work / "results.md").read_text()
    assert "\n- schedule: 2 epochs (paper 1000)\n" in md and "backbone (paper" not in md
    assert "(as its file states them; the run's opts above come after):" in md
    assert "<li>schedule: 2 epochs (paper 1000)</li>" in (work / "report.html").read_text()
    child.write_text(f"_base_: {base}\n")  # the file changed since: the run is the record
    run(["--work_dir", str(work), "--evaluate"])
    again = json.loads((sorted((work / "evaluations").iterdir())[-1] /
                        "results.json").read_text())["protocol"]
    assert {k: again[k] for k in ("method", "config", "opts", "departures")} == \
        {k: trained[k] for k in ("method", "config", "opts", "departures")}


def test_user_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    cfg = make_config(tmp_path, epochs=1)
    code = train_val.main(["--config", str(cfg), "--work_dir", str(tmp_path / "x"),
                           "--class_name", "bolt", "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "class 'bolt' not in" in err and "Traceback" not in err
    code = train_val.main(["--config", str(cfg), "--opts", "trainer.max_epochs=2"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'max_epoch'" in err


def test_resume_after_interruption_gives_the_same_weights(tmp_path, monkeypatch):
    from dualmem.utils.engine import Trainer

    cfg = make_config(tmp_path, epochs=4, val_freq=2)
    full, part = tmp_path / "full", tmp_path / "part"
    run(["--config", str(cfg), "--work_dir", str(full)])

    original = Trainer.train_one_epoch

    def interrupted(self, epoch, start_step=0):
        if epoch == 2:  # dies during the third epoch: epochs 1-2 are in last.pth
            raise KeyboardInterrupt
        return original(self, epoch, start_step)

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(["--config", str(cfg), "--work_dir", str(part)])
    assert torch.load(part / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    run(["--config", str(cfg), "--work_dir", str(part), "--resume"])

    a = torch.load(full / "checkpoints" / "last.pth", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["scheduler"] == b["scheduler"]


def test_feature_cache_gives_the_same_loss_trajectory(tmp_path):
    from dualmem.utils.config import load_config
    from dualmem.utils.engine import Trainer

    cfg_path = make_config(tmp_path, epochs=3)
    losses, finals = {}, {}
    for cache in (False, True):
        cfg = load_config(cfg_path, [f"trainer.feature_cache={str(cache).lower()}"])
        trainer = Trainer(cfg, tmp_path / f"cache_{cache}", torch.device("cpu"),
                          progress=False)
        assert trainer.use_cache is cache
        losses[cache] = [trainer.train_one_epoch(e) for e in range(3)]
        assert isinstance(trainer.net, torch.nn.Module)
        finals[cache] = trainer.evaluate_now()["mean"]
        trainer.close()
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    for key, value in finals[False].items():
        if value is not None:
            assert finals[True][key] == pytest.approx(value, abs=1e-4), key


def test_disk_feature_cache_is_reused_and_keyed_by_the_data(tmp_path):
    """A second run reads the cache written by the first and trains identically; changing an
    image file or the cache dtype gives a new key (a rebuild, never a stale hit)."""
    import os

    from dualmem.utils.config import load_config
    from dualmem.utils.engine import Trainer

    cfg_path = make_config(tmp_path, epochs=2)
    cache_dir = tmp_path / "cache"

    def train(tag, *opts):
        cfg = load_config(cfg_path, [f"trainer.feature_cache_dir={cache_dir}", *opts])
        trainer = Trainer(cfg, tmp_path / tag, torch.device("cpu"), progress=False)
        losses = [trainer.train_one_epoch(e) for e in range(2)]
        score = trainer.evaluate_now()["mean"]["pixel_auroc"]
        trainer.close()
        return losses, score, (tmp_path / tag / "log.txt").read_text()

    first, score1, log1 = train("a")
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) == 2 and files[0].startswith("test-") and files[1].startswith("train-")
    assert log1.count("computed and written to") == 2
    second, score2, log2 = train("b")
    assert log2.count("read from") == 2 and "computed" not in log2
    assert second == pytest.approx(first, rel=1e-6)
    assert score2 == pytest.approx(score1, abs=1e-9)
    # a touched training image (new mtime) changes the train key only
    image = next((tmp_path / "data").rglob("train/good/*.png"))
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    _, _, log3 = train("c")
    assert log3.count("computed and written to") == 1 and log3.count("read from") == 1
    _, _, log4 = train("d", "trainer.feature_cache_dtype=float16")
    assert log4.count("computed and written to") == 2
    assert len(list(cache_dir.iterdir())) == 5
    # a damaged cache file is an error naming it, not a silent rebuild or a crash later
    for victim in cache_dir.glob("test-*"):
        victim.write_bytes(b"not a cache")
    cfg = load_config(cfg_path, [f"trainer.feature_cache_dir={cache_dir}"])
    trainer = Trainer(cfg, tmp_path / "e", torch.device("cpu"), progress=False)
    with pytest.raises(RuntimeError, match=r"feature cache .*test-.* is unreadable"):
        trainer.evaluate_now()
    trainer.close()


def test_channels_last_and_compile_train_like_the_default(tmp_path):
    """``trainer.channels_last`` and ``trainer.compile`` change speed, not results (dropout on:
    the CPU fast-dropout attention and mask draws run eagerly inside the compiled step)."""
    from dualmem.utils.config import load_config
    from dualmem.utils.engine import Trainer

    cfg_path = make_config(tmp_path, epochs=1)
    losses = {}
    for tag, opts in (("plain", []), ("nhwc", ["trainer.channels_last=true"]),
                      ("compiled", ["trainer.compile=true"])):
        cfg = load_config(cfg_path, ["trainer.feature_cache=false", "net.2.kwargs.dropout=0.1",
                                     *opts])
        trainer = Trainer(cfg, tmp_path / tag, torch.device("cpu"), progress=False)
        losses[tag] = trainer.train_one_epoch(0)
        if tag == "nhwc":
            weight = next(p for p in trainer.model.backbone.parameters() if p.dim() == 4)
            assert weight.is_contiguous(memory_format=torch.channels_last)
        if tag == "compiled":
            assert hasattr(trainer.train_net, "_orig_mod")  # an OptimizedModule
        trainer.close()
    assert losses["nhwc"] == pytest.approx(losses["plain"], rel=1e-4)
    assert losses["compiled"] == pytest.approx(losses["plain"], rel=1e-4)


def test_compile_without_a_cxx_compiler_is_a_clear_error(tmp_path, monkeypatch):
    import shutil

    from dualmem.utils.config import load_config
    from dualmem.utils.engine import Trainer

    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg = load_config(make_config(tmp_path), ["trainer.compile=true"])
    with pytest.raises(ValueError, match="trainer.compile on CPU needs a C\\+\\+ compiler"):
        Trainer(cfg, tmp_path / "w", torch.device("cpu"), progress=False)


def test_feature_cache_true_with_augmentation_is_refused(tmp_path):
    from dualmem.utils.config import load_config
    from dualmem.utils.engine import Trainer

    cfg = load_config(make_config(tmp_path), ["trainer.feature_cache=true",
                                              "dataset.train.hflip=true"])
    with pytest.raises(ValueError, match="augmentations are on"):
        Trainer(cfg, tmp_path / "w", torch.device("cpu"), progress=False)


def test_labelled_anomalies_need_a_net_that_learns_from_them(tmp_path):
    from dualmem.utils.config import load_config
    from dualmem.utils.engine import Trainer

    cfg = load_config(make_config(tmp_path), ["dataset.seen_anomalies.num_per_class=1",
                                              "dataset.seen_anomalies.seed=0"])
    with pytest.raises(ValueError, match="no module of this net learns from them"):
        Trainer(cfg, tmp_path / "w", torch.device("cpu"), progress=False)
