"""Seeds, devices and other run-wide switches."""
import os
import random

import numpy as np
import torch
from dualmem.utils.errors import UserError


def set_seed(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(name=None):
    """``None``/'auto' -> CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return device


def amp_dtype_for(setting, device):
    """``trainer.amp``: false | true (fp16 on CUDA, bf16 on CPU) | 'fp16' | 'bf16'."""
    if not setting:
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16" or (setting is True and device.type == "cuda"):
        if device.type != "cuda":
            raise UserError("trainer.amp 'fp16' needs CUDA; use 'bf16' on CPU")
        return torch.float16
    return torch.bfloat16
