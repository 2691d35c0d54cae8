"""UniAD's ``initializer`` config: how Linear/Conv weights of a head are initialised."""
import torch.nn as nn
from dualmem.utils.errors import UserError


def initialize_from_cfg(module, cfg):
    """``cfg`` = {method: xavier_uniform|xavier_normal|msra|normal, std?}; None keeps defaults."""
    if not cfg:
        return
    method = cfg.get("method", "xavier_uniform") if isinstance(cfg, dict) else str(cfg)
    valid = ("xavier_uniform", "xavier_normal", "msra", "kaiming_normal", "normal")
    if method not in valid:
        raise UserError(f"initializer.method must be one of {valid}, got '{method}'")
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if method == "xavier_uniform":
                nn.init.xavier_uniform_(m.weight)
            elif method == "xavier_normal":
                nn.init.xavier_normal_(m.weight)
            elif method in ("msra", "kaiming_normal"):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, std=float(cfg.get("std", 0.01)))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
