"""Checkpoints written atomically, holding plain data only, and read without running code.

A checkpoint is the normal way to share a model, so opening one must be safe: it holds only
tensors and plain Python data (numbers, strings, lists, tuples, dicts), is written so, and is
read with ``torch.load(weights_only=True)``. A file that needs more is refused unless the user
says they trust it (``--trust_checkpoint``).
"""
import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from dualmem.utils.errors import UserError


class CheckpointError(UserError):
    pass


def plain_state(obj, where="state"):
    """The same data as plain types: numpy -> Python numbers / tensors, mappings -> dict,
    paths -> str. Anything else is an error here, at save time, rather than a checkpoint
    that needs unpickling code to open."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if torch.is_tensor(obj) or isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return str(obj)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj).__module__ == "collections" else {}
        for k, v in obj.items():
            out[plain_state(k, where)] = plain_state(v, f"{where}.{k}")
        return out
    if isinstance(obj, tuple):
        return tuple(plain_state(v, f"{where}.{i}") for i, v in enumerate(obj))
    if isinstance(obj, (list, set)):
        return [plain_state(v, f"{where}.{i}") for i, v in enumerate(obj)]
    raise TypeError(f"checkpoint entry {where} is a {type(obj).__module__}."
                    f"{type(obj).__name__}; checkpoints hold tensors and plain data only")


def save_checkpoint(state, path):
    """Write to a temp file in the same folder, fsync, then rename over ``path``: a crash
    at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    state = plain_state(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu", trusted=False):
    """``trusted=False`` (the default) never runs code from the file: anything beyond tensors
    and plain data is refused before it is built."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        if trusted:
            raise CheckpointError(f"checkpoint {path} is corrupt ({exc})") from None
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data, and opening "
            f"it could run code from it: refused ({first[0] if first else 'unpickling error'}). "
            f"Checkpoints written by DualMem never need this; if you trust where this file "
            f"came from, pass --trust_checkpoint") from None
    except Exception as exc:  # torch raises several types for truncated/garbage files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a DualMem/PyTorch "
                              f"checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} has no 'model' entry; keys: "
                              f"{list(state)[:10] if isinstance(state, dict) else type(state)}")
    return state


def rng_state():
    """Every generator's state as plain data (numpy's key array as a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuple(value):
    """random.setstate wants tuples where a round trip may have made lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
