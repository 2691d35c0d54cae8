"""The shipped experiment configs load and hold the settings their READMEs state; the shared
CLI helper points a config at --data_root."""
import argparse

import pytest
from easydict import EasyDict

from conftest import ROOT
from dualmem.tools._common import add_data_args, add_run_args
from dualmem.utils.run_plan import apply_data_args
from dualmem.utils.config import ConfigError, load_config

EXP = ROOT / "experiments"
SPLITS = {"01234": [0, 1, 2, 3, 4], "56789": [5, 6, 7, 8, 9], "02468": [0, 2, 4, 6, 8],
          "13579": [1, 3, 5, 7, 9]}


def rec(cfg):
    return cfg.net[2].kwargs


@pytest.mark.parametrize("path, dtype", [("MVTec-AD/uniad/config.yaml", "mvtec"),
                                         ("VisA/uniad/config.yaml", "visa")])
def test_paper_configs(path, dtype):
    cfg = load_config(EXP / path)
    assert cfg.dataset.type == dtype and cfg.dataset.input_size == [224, 224]
    assert cfg.dataset.image_reader.kwargs.color_mode == "RGB"  # not lost to the type change
    assert cfg.net[0].type == "models.backbones.efficientnet_b4"
    assert cfg.net[0].kwargs.outlayers == [1, 2, 3, 4] and cfg.net[1].kwargs.outstrides == [16]
    r = rec(cfg)
    assert (r.hidden_dim, r.num_encoder_layers, r.num_decoder_layers, r.nhead,
            r.dim_feedforward) == (256, 4, 4, 8, 1024)
    assert r.neighbor_mask.neighbor_size == [7, 7] and r.feature_jitter.scale == 20.0
    assert cfg.trainer.max_epoch == 1000 and cfg.trainer.lr_scheduler.type == "StepLR"
    assert cfg.trainer.lr_scheduler.kwargs.step_size == 800
    assert cfg.trainer.optimizer.kwargs.lr == 1e-4
    assert cfg.evaluator.image_score.reduction == "max"


@pytest.mark.parametrize("path", ["MVTec-AD/uniad/lite.yaml", "VisA/uniad/lite.yaml"])
def test_lite_configs(path):
    cfg = load_config(EXP / path)
    assert cfg.net[0].type == "models.backbones.efficientnet_lite0"
    assert cfg.net[0].kwargs.pretrained is True
    assert rec(cfg).neighbor_mask.neighbor_size == [7, 7] and rec(cfg).hidden_dim == 128
    assert cfg.trainer.lr_scheduler == {"type": "CosineAnnealingLR", "kwargs": {}}
    assert cfg.dataset.type == ("visa" if "VisA" in path else "mvtec")


@pytest.mark.parametrize("split", list(SPLITS))
def test_cifar_configs(split):
    cfg = load_config(EXP / "CIFAR-10" / split / "config.yaml")
    assert cfg.dataset.type == "cifar10"
    assert cfg.dataset.cifar10.normal_classes == SPLITS[split]
    assert cfg.net[0].kwargs.outlayers == [1, 2, 3, 4, 5]
    assert cfg.evaluator.image_score.reduction == "mean"
    assert cfg.evaluator.key_metric == "image_auroc"
    assert not any(m.startswith("pixel") for m in cfg.evaluator.metrics)
    lite = load_config(EXP / "CIFAR-10" / split / "lite.yaml")
    assert lite.dataset.cifar10.normal_classes == SPLITS[split]
    assert lite.net[0].type == "models.backbones.efficientnet_lite0"
    assert lite.net[0].kwargs.outlayers == [1, 2, 3, 4, 5]


def test_experiment_readmes_state_published_numbers():
    assert "96.5" in (EXP / "MVTec-AD/uniad/README.md").read_text()
    assert "88.8" in (EXP / "VisA/uniad/README.md").read_text()
    cifar = (EXP / "CIFAR-10/README.md").read_text()
    assert all(x in cifar for x in ("84.4", "79.6", "93.0", "89.1", "86.5"))


def parse(argv):
    p = argparse.ArgumentParser()
    add_data_args(p)
    add_run_args(p)
    return p.parse_args(argv)


def test_apply_data_args(tmp_path):
    cfg = EasyDict({"dataset": {"type": "synthetic"}})
    a = parse(["--data_root", str(tmp_path / "x")])
    apply_data_args(cfg, a.data_root, a.data_type)
    assert cfg.dataset.type == "mvtec" and cfg.dataset.data_root == str(tmp_path / "x")
    cfg = EasyDict({"dataset": {"type": "visa"}})
    a = parse(["--data_root", "a", "--data_root", "b", "--threads", "1"])
    apply_data_args(cfg, a.data_root, a.data_type, classes=["candle"])
    assert cfg.dataset.type == "visa" and len(cfg.dataset.data_root) == 2
    assert cfg.dataset.classes == ["candle"] and a.threads == 1
    cfg = EasyDict({"dataset": {"type": "explicit"}})
    a = parse(["--data_root", "m.json", "--data_type", "ader"])
    apply_data_args(cfg, a.data_root, a.data_type)
    assert cfg.dataset.type == "ader"


def test_tools_are_arguments_plus_one_call():
    """A run's lifecycle is library logic (utils/run_plan.py, utils/per_class.py,
    utils/sweep.py, utils/engine/runs.py): no tool imports another tool, the training tools
    take only argument and launch helpers from tools/_common.py, and tests import the moved
    functions from their new home."""
    import ast

    from conftest import ROOT

    cli = {"add_config_arg", "add_data_args", "add_device_args", "add_run_args",
           "add_trust_arg", "apply_device_args", "apply_trust_args", "check_run_flags",
           "launch", "run_main", "warn_if_busy"}

    def imported(text):
        """{tools module: names} this source imports (``from tools import x``: 'tools.x')."""
        found = {}

        def own(name):  # the package is 'dualmem': 'dualmem.tools.x' is 'tools.x' here
            return name[len("dualmem."):] if name.startswith("dualmem.") else name

        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module == "dualmem":
                for alias in node.names:
                    if alias.name == "tools":
                        found.setdefault("tools", set())
            elif isinstance(node, ast.ImportFrom) and own(node.module or "").split(".")[0] \
                    == "tools":
                module = own(node.module)
                for alias in node.names:
                    name = module if module != "tools" else f"tools.{alias.name}"
                    found.setdefault(name, set()).add(alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if own(alias.name).split(".")[0] == "tools":
                        found.setdefault(own(alias.name), set())
        return found

    for path in (ROOT / "tools").glob("*.py"):
        modules = imported(path.read_text(encoding="utf-8"))
        assert set(modules) <= {"tools._common", "tools._bench"}, path.name
        if path.stem in ("train_val", "train_unified", "train_per_class", "sweep"):
            assert modules.get("tools._common", set()) <= cli, path.name
            assert len(path.read_text(encoding="utf-8").splitlines()) < 80, path.name
    for path in (ROOT / "tests").glob("*.py"):
        common = imported(path.read_text(encoding="utf-8")).get("tools._common", set())
        assert common <= cli, (path.name, common - cli)


def test_busy_cpu_note_suggests_one_thread(monkeypatch, capsys):
    import os

    import torch

    from dualmem.tools._common import warn_if_busy

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    warn_if_busy()
    assert "load average 3.5 on 2 CPUs" in capsys.readouterr().err
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.3, 0.2))
    warn_if_busy()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one thread: nothing to wait on
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    warn_if_busy()
    assert capsys.readouterr().err == ""


def _departures(cfg):
    return {k: v for k, v in (cfg.get("departures") or {}).items() if v}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(EXP)) for p in
                                        [*EXP.glob("MVTec-AD/*/*.yaml"), *EXP.glob("VisA/*/*.yaml"),
                                         *EXP.glob("CIFAR-10/*/*.yaml"),
                                         *EXP.glob("demo/*.yaml")]
                                        if "_base_:" in p.read_text()))
def test_configs_state_their_departures_truly(path):
    """The ``departures`` a config copies into every results protocol say what it runs."""
    cfg = load_config(EXP / path)
    dep, head = _departures(cfg), cfg.net[-1]
    text = " ".join(dep.values())
    assert ("Lite0" in text) == (cfg.net[0].type.endswith("efficientnet_lite0")), path
    if head.type.endswith("DMAD"):
        assert dep["method"].startswith("our reconstruction of DMAD")
        k = head.kwargs
        two = list(k.knowledge) == ["distance"] and not k.include_query
        assert ("the two distances only" in dep["knowledge"]) == two, path
        real = "real_distance" in list(k.knowledge)
        assert ("the nearest labelled-anomaly memory" in dep["knowledge"]) == real, path
        corrected = k.get("score", "head") == "normal_plus_correction"
        assert ("score" in dep) == corrected, path
        if corrected:
            assert f"bounded by {k.correction_bound:g} mean normal" in dep["score"], path
            bonus = float(k.get("seen_bonus", 0))
            assert (f"plus {bonus:g} x (1 - d_real / d_normal)" in dep["score"]) == (bonus > 0)
        assert f"{cfg.trainer.max_epoch} epochs" in dep["head_and_loss"]
    elif head.type.endswith("DMADReference"):
        assert dep["method"].startswith("the authors' code")
        noise = head.kwargs.noise_std
        assert (f"noise std {noise:g}" in dep["head_and_loss"]) == (noise != 0.015), path
        assert f"{cfg.trainer.max_epoch} epochs" in dep["head_and_loss"]
        assert "centres" not in dep and "speed" not in dep and "image_score" not in dep
        assert "score" not in dep
    elif head.type.endswith("PatchCore"):
        k, score = head.kwargs, cfg.evaluator.image_score
        assert score.reduction == "max" and score.kernel == 1 and k.reweight
        assert "reweighting x the maximum of the blurred map" in dep["image_score"]
        if "coreset" in dep:
            assert f"{k.coreset_ratio * 100:g} % on a {k.coreset_proj_dim}-d" in dep["coreset"]
        else:
            assert (k.coreset_ratio, k.coreset_proj_dim) == (0.1, 128), path  # the paper's
        if "crop" in dep:
            assert cfg.dataset.input_size == [224, 224], path
        return
    elif cfg.net[0].type.endswith("efficientnet_lite0"):  # UniAD / DuMeNet, smaller
        assert f"{cfg.trainer.max_epoch} epochs" in dep["schedule"]
        assert f"{cfg.net[2].kwargs.num_encoder_layers} + {cfg.net[2].kwargs.num_decoder_layers}" \
            " layers" in dep["transformer"]
    else:
        assert ("spatial_memory" in dep) == ("dumenet" in path), path  # paper settings otherwise
    if "speed" in dep:
        assert f"{head.kwargs.coreset_proj_dim}-d coreset" in dep["speed"]
        assert f"{cfg.dataset.train.pseudo_anomaly.pool} fixed pseudo" in dep["speed"]
    if "image_score" in dep:
        assert cfg.evaluator.image_score.reduction == "topk" and "top 1 %" in dep["image_score"]


def test_departures_must_be_sentences(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"_base_: {EXP / 'MVTec-AD/uniad/lite.yaml'}\ndepartures:\n  backbone: 3\n")
    with pytest.raises(ConfigError, match=r"'departures.backbone' must be str, got int 3"):
        load_config(path)
    path.write_text(f"_base_: {EXP / 'MVTec-AD/uniad/lite.yaml'}\ndepartures:\n  backbone: null\n")
    assert "backbone" not in _departures(load_config(path))
