"""What the engine builds from the config's trainer section: optimizer, schedule, autocast."""
import torch

from dualmem.utils.config import to_plain
from dualmem.utils.config_validation import SCHEDULER_DEFAULTS, optim_classes
from dualmem.utils.misc import amp_dtype_for  # noqa: F401  (part of the engine's API)
from dualmem.utils.errors import UserError

OPTIMIZERS, SCHEDULERS = optim_classes()


def build_optimizer(params, cfg):
    """``trainer.optimizer`` as resolved (a config without one has runtime.yaml's, from
    utils/config_defaults.py)."""
    kind = cfg.get("type") if isinstance(cfg, dict) else None
    if kind not in OPTIMIZERS:
        raise UserError(f"trainer.optimizer.type must be one of {list(OPTIMIZERS)}, "
                         f"got '{kind}'")
    try:
        return OPTIMIZERS[kind](params, **(cfg.get("kwargs") or {}))
    except TypeError as exc:
        raise UserError(f"trainer.optimizer ({kind}): {exc}") from None


def build_scheduler(optimizer, cfg, max_epoch):
    """``trainer.lr_scheduler`` as resolved; null (a config's own choice) means none."""
    if cfg is None:
        return None
    kind = cfg.get("type")
    kwargs = dict(cfg.get("kwargs") or {})
    if kind not in SCHEDULERS:
        raise UserError(f"trainer.lr_scheduler.type must be StepLR, MultiStepLR or "
                         f"CosineAnnealingLR, got '{kind}'")
    for key in SCHEDULER_DEFAULTS.get(kind, ()):
        kwargs.setdefault(key, max_epoch)
    try:
        return SCHEDULERS[kind](optimizer, **kwargs)
    except TypeError as exc:
        raise UserError(f"trainer.lr_scheduler ({kind}): {exc}") from None


def schedule_changed(old_cfg, new_cfg):
    """Whether the keys the learning-rate schedule depends on differ between two configs."""
    def part(cfg):
        tr = (cfg or {}).get("trainer") or {}
        return (tr.get("max_epoch"), to_plain(tr.get("lr_scheduler")),
                to_plain((tr.get("optimizer") or {}).get("kwargs")))
    return old_cfg is not None and part(old_cfg) != part(new_cfg)


def wrap_training_net(net, trainer_cfg, device, world, trains):
    """The module the training step calls: DDP when distributed (and something trains), then
    ``torch.compile`` when ``trainer.compile`` (evaluation runs the plain module)."""
    if world > 1 and trains:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # buffers here are frozen statistics and constants: no need to sync them every step
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
            inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False}
        net = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(trainer_cfg.find_unused_parameters),
            **sync)
    mode = trainer_cfg.compile
    if mode:
        import os
        import shutil

        import torch._inductor.config as inductor_config

        if device.type == "cpu" and not any(
                shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
            raise UserError("trainer.compile on CPU needs a C++ compiler (g++ or clang++, or "
                            "$CXX) for torch.compile's code generation; install one or set "
                            "trainer.compile: false")
        # random draws (jitter, dropout) as in eager mode: compiling changes speed only
        inductor_config.fallback_random = True
        net = torch.compile(net, mode=None if mode is True else mode)
    return net
