"""PyTorch DDP plumbing for ``torchrun``: a single process is the default and needs nothing.

``torchrun --nproc_per_node=N tools/train_val.py ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; then
gloo runs on CPU and NCCL on GPU. Rank 0 alone writes logs, checkpoints and results.
"""
import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def env_world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device):
    """Start the process group when launched by torchrun; returns the device to use."""
    if env_world_size() <= 1 or dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return device


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 does the work (e.g. generating data) while the others wait, then they follow."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class NullWriter:
    """TensorBoard writer stand-in for ranks other than 0."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
