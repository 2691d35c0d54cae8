"""Crafted files a user may be sent: opening them must never run code from them (issue #25,
items 1-2). Each payload would write a marker file if it ran; the tests assert the marker is
absent and the refusal names what was refused."""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT
from dualmem.models.registry import MODELS, UntrustedTypeError, reset_trust, trust_plugins
from dualmem.utils.errors import UserError


def evil_config(marker):
    return {"net": [{"name": "backbone", "type": "os.system",
                     "kwargs": {"command": f"echo PWNED > {marker}"}}],
            "dataset": {"input_size": [224, 224]}}


def evil_checkpoint(path, marker):
    torch.save({"model": {}, "config": evil_config(marker), "pixel_mean": [.5] * 3,
                "pixel_std": [.5] * 3, "classes": ["x"]}, path)
    return path


def run_tool(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def image(tmp_path):
    import cv2

    path = tmp_path / "img.png"
    cv2.imwrite(str(path), np.zeros((32, 32, 3), np.uint8))
    return path


@pytest.mark.parametrize("tool", ["predict", "export"])
def test_plain_data_checkpoint_cannot_run_a_command(tmp_path, image, tool):
    marker = tmp_path / "pwned.txt"
    ckpt = evil_checkpoint(tmp_path / "evil.pth", marker)
    if tool == "predict":
        res = run_tool("tools/predict.py", "--checkpoint", str(ckpt), "--input", str(image),
                       "--output", str(tmp_path / "out"))
    else:
        res = run_tool("tools/export.py", "--checkpoint", str(ckpt), "--format", "onnx", "--output",
                       str(tmp_path / "m.onnx"))
    assert not marker.exists(), "the stored config ran a shell command"
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "'os.system'" in errors[0] and "refused" in errors[0], res.stderr
    assert "--plugins" in errors[0]


def test_api_refuses_a_crafted_checkpoint(tmp_path):
    from dualmem.utils.detector import load_detector

    marker = tmp_path / "pwned.txt"
    ckpt = evil_checkpoint(tmp_path / "evil.pth", marker)
    with pytest.raises(KeyError, match="os.system"):
        load_detector(ckpt)
    assert not marker.exists()


def test_run_folder_config_cannot_run_a_command(tmp_path):
    """--evaluate / --resume rebuild the model from RUN/config.yaml."""
    marker = tmp_path / "pwned.txt"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = evil_config(marker)
    cfg["dataset"].update({"type": "synthetic", "data_root": str(tmp_path / "data"),
                           "classes": ["disc"]})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "run.json").write_text(json.dumps({"tool": "train_val", "history": []}))
    evil_checkpoint(run / "checkpoints" / "last.pth", marker)
    for action in ("--evaluate", "--resume"):
        res = run_tool("tools/train_val.py", "--work_dir", str(run), action)
        assert not marker.exists(), f"{action} ran the stored config's command"
        assert res.returncode == 2, res.stderr[-2000:]
        assert "os.system" in res.stderr


def test_dotted_paths_resolve_only_to_registered_classes():
    assert MODELS.get("models.necks.MFCN") is MODELS.get("MFCN")
    # DualMem's own module, but not a registered class: refused
    with pytest.raises(KeyError, match="unknown model type"):
        MODELS.get("models.model_builder.build_module")
    with pytest.raises(UntrustedTypeError, match="refused before importing"):
        MODELS.get("subprocess.call")


def test_plugins_named_on_the_command_line_are_the_only_way_in(tmp_path, monkeypatch):
    """A user's own module: refused (and not imported) until ``--plugins`` names it."""
    name = "dualmem_adversarial_plugin"
    (tmp_path / f"{name}.py").write_text(
        "import torch.nn as nn\nclass Tiny(nn.Module):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(UntrustedTypeError, match=f"--plugins {name}"):
            MODELS.get(f"{name}.Tiny")
        assert name not in sys.modules, "the module was imported before the refusal"
        trust_plugins([name])
        assert MODELS.get(f"{name}.Tiny").__name__ == "Tiny"
    finally:
        reset_trust()
        sys.modules.pop(name, None)
    with pytest.raises(UntrustedTypeError):
        MODELS.get(f"{name}.Tiny")


def test_plugins_never_open_dualmem_s_own_internals(tmp_path, monkeypatch):
    """Trusting a user's module trusts that module only: DualMem's own modules still give
    registered classes only, a plugin cannot take DualMem's names, and a refusal of a
    ``dualmem.`` path never advises trusting DualMem as a plugin."""
    name = "dualmem_adversarial_plugin2"
    (tmp_path / f"{name}.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        trust_plugins([name])
        for key in ("models.registry.trust_everything", "models.model_builder.build_module",
                    "dualmem.models.registry.trust_everything"):
            with pytest.raises(UntrustedTypeError):
                MODELS.get(key)
        for reserved in ("models", "models.necks", "dualmem", "dualmem.utils"):
            with pytest.raises(UserError, match=f"--plugins {reserved}: .* rename your package"):
                trust_plugins([reserved])
        with pytest.raises(UntrustedTypeError) as err:
            MODELS.get("dualmem.utils.checkpoint.load_checkpoint")
        assert "--plugins" not in str(err.value)
        assert MODELS.get("dualmem.models.necks.MFCN") is MODELS.get("models.necks.MFCN")
    finally:
        reset_trust()
        sys.modules.pop(name, None)


# ----------------------------------------------------------------------------- CIFAR pickles
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').write('PWNED')",))


def test_cifar_pickle_with_code_is_refused_by_name(tmp_path):
    from dualmem.datasets.prepare.cifar10 import PrepareError, _load_batch

    marker = tmp_path / "pwned.txt"
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1],
                     b"x": _Payload(marker)}, f, protocol=2)
    with pytest.raises(PrepareError, match=r"names .*\.eval'"):
        _load_batch(path)
    assert not marker.exists()


def test_cifar_official_structure_still_loads(tmp_path):
    from dualmem.datasets.prepare.cifar10 import _load_batch

    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:  # as the official files: protocol 2, bytes keys, a label list
        pickle.dump({b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4, 1],
                     b"data": data, b"filenames": [b"a.png"] * 4}, f, protocol=2)
    images, labels = _load_batch(path)
    assert labels.tolist() == [3, 1, 4, 1]
    np.testing.assert_array_equal(images[2, 0, 0], data[2, [0, 1024, 2048]])
