"""Shared test setup: the repo root importable, two CPU threads, no network, tiny configs."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(2)


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
