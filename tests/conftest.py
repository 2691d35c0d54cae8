"""Shared test setup: `dualmem` bound to this checkout, two CPU threads, no network, tiny configs."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import _checkout  # noqa: E402,F401  (`import dualmem` is this checkout, installed or not)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _user_cache(tmp_path_factory):
    """Manifest caches of --data_root go to a temporary folder, never to ~/.cache."""
    if "DUALMEM_CACHE_DIR" not in os.environ:
        os.environ["DUALMEM_CACHE_DIR"] = str(tmp_path_factory.mktemp("dualmem_cache"))
    yield


def tiny_net(hidden_dim=32, feature_stride=16, backbone="resnet18", outlayers=(1, 2, 3)):
    """A small random-weight network in UniAD's net-list form."""
    return [
        {"name": "backbone", "type": f"models.backbones.{backbone}", "frozen": True,
         "kwargs": {"pretrained": False, "outlayers": list(outlayers)}},
        {"name": "neck", "prev": "backbone", "type": "models.necks.MFCN",
         "kwargs": {"outstrides": [feature_stride]}},
        {"name": "reconstruction", "prev": "neck", "type": "models.reconstructions.UniAD",
         "kwargs": {"hidden_dim": hidden_dim, "nhead": 4, "num_encoder_layers": 1,
                    "num_decoder_layers": 1, "dim_feedforward": 64, "dropout": 0.0,
                    "feature_jitter": {"scale": 20.0, "prob": 1.0},
                    "neighbor_mask": {"neighbor_size": [3, 3], "mask": [True, True, True]},
                    "initializer": {"method": "xavier_uniform"}}},
    ]


def tiny_dmad_net(out_dim=48):
    """A small random-weight DMAD net: ResNet-18 layers 1-2, PatchCore neck, DMAD head."""
    return [
        {"name": "backbone", "type": "models.backbones.resnet18", "frozen": True,
         "kwargs": {"pretrained": False, "outlayers": [1, 2]}},
        {"name": "neck", "prev": "backbone", "type": "models.necks.PatchCoreNeck",
         "kwargs": {"out_dim": out_dim, "projection": "random", "seed": 1}},
        {"name": "head", "prev": "neck", "type": "models.heads.DMAD",
         "kwargs": {"coreset_ratio": 0.2, "hidden": [16], "num_centers": 2,
                    "center_samples": 2}},
    ]


def synthetic_dataset(root, seed, image_size=64, num_train=6, num_test_good=3,
                      num_test_defect=1, batch_size=4, classes=("disc", "weave")):
    """The ``dataset`` section of a tiny synthetic run (data generated under ``root``)."""
    return {"type": "synthetic",
            "synthetic": {"root": str(root), "seed": seed, "classes": list(classes),
                          "image_size": image_size, "num_train": num_train,
                          "num_test_good": num_test_good, "num_test_defect": num_test_defect},
            "input_size": [image_size, image_size], "batch_size": batch_size, "workers": 0}
