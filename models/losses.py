"""Training criteria, configured as UniAD's ``criterion:`` list of weighted losses."""
import torch.nn as nn
import torch.nn.functional as F

from models.registry import Registry

LOSSES = Registry("criterion")


@LOSSES.register(path="models.losses")
class FeatureMSELoss(nn.Module):
    """MSE between reconstructed and aligned features (UniAD's only loss)."""

    def __init__(self, weight=1.0):
        super().__init__()
        self.weight = weight

    def forward(self, outputs):
        return F.mse_loss(outputs["feature_rec"], outputs["feature_align"])


class Criterion(nn.Module):
    """Weighted sum of the configured losses; also reports each term for logging."""

    def __init__(self, cfg_list):
        super().__init__()
        self.terms = nn.ModuleDict()
        for i, entry in enumerate(cfg_list or []):
            try:
                cls = LOSSES.get(entry["type"])
            except KeyError as exc:
                raise ValueError(f"criterion.{i}: {exc.args[0]}") from None
            try:
                self.terms[entry.get("name", entry["type"])] = cls(**(entry.get("kwargs") or {}))
            except TypeError as exc:
                raise ValueError(f"criterion.{i} ({entry['type']}): {exc}") from None
        if not self.terms:
            raise ValueError("criterion: at least one loss is required")

    def forward(self, outputs):
        parts = {name: term(outputs) for name, term in self.terms.items()}
        total = sum(term.weight * parts[name] for name, term in self.terms.items())
        return total, parts
