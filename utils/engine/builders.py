"""What the engine builds from the config's trainer section: optimizer, schedule, autocast."""
import torch

from utils.config import to_plain
from utils.errors import UserError

OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}


def build_optimizer(params, cfg):
    cfg = cfg or {"type": "AdamW", "kwargs": {"lr": 1e-4}}
    kind = cfg.get("type", "AdamW")
    if kind not in OPTIMIZERS:
        raise UserError(f"trainer.optimizer.type must be one of {list(OPTIMIZERS)}, "
                         f"got '{kind}'")
    try:
        return OPTIMIZERS[kind](params, **(cfg.get("kwargs") or {}))
    except TypeError as exc:
        raise UserError(f"trainer.optimizer ({kind}): {exc}") from None


def build_scheduler(optimizer, cfg, max_epoch):
    if not cfg:
        return None
    kind = cfg.get("type")
    kwargs = dict(cfg.get("kwargs") or {})
    if kind == "StepLR":
        return torch.optim.lr_scheduler.StepLR(optimizer, **kwargs)
    if kind in ("CosineAnnealingLR", "cosine"):
        kwargs.setdefault("T_max", max_epoch)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, **kwargs)
    if kind == "MultiStepLR":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, **kwargs)
    raise UserError(f"trainer.lr_scheduler.type must be StepLR, MultiStepLR or "
                     f"CosineAnnealingLR, got '{kind}'")


def schedule_changed(old_cfg, new_cfg):
    """Whether the keys the learning-rate schedule depends on differ between two configs."""
    def part(cfg):
        tr = (cfg or {}).get("trainer") or {}
        return (tr.get("max_epoch"), to_plain(tr.get("lr_scheduler")),
                to_plain((tr.get("optimizer") or {}).get("kwargs")))
    return old_cfg is not None and part(old_cfg) != part(new_cfg)


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
