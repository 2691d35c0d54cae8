"""Training criteria, configured as UniAD's ``criterion:`` list of weighted losses."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualmem.models.registry import Registry
from dualmem.utils.errors import UserError

LOSSES = Registry("criterion")


@LOSSES.register(path="models.losses")
class FeatureMSELoss(nn.Module):
    """MSE between reconstructed and aligned features (UniAD's only loss)."""

    def __init__(self, weight=1.0):
        super().__init__()
        self.weight = weight

    def forward(self, outputs):
        return F.mse_loss(outputs["feature_rec"], outputs["feature_align"])


# ----------------------------------------------------------------------------- DMAD's patch losses
def _patch_pair(outputs, who):
    if "patch_target" not in outputs:
        raise KeyError(f"{who}: no 'patch_target' in the outputs; DMAD makes it from "
                       f"inputs['mask'], which training batches carry")
    return outputs["patch_logits"].float(), outputs["patch_target"].float()


@LOSSES.register(path="models.heads.dmad")  # the dotted path configs already use
class PatchFocalLoss(nn.Module):
    """Focal loss on patch logits vs (soft) patch targets, mean over patches.

    ``alpha``: weight of the anomalous term (normal term 1 - alpha); null = unweighted.
    """

    def __init__(self, weight=1.0, gamma=2.0, alpha=None):
        super().__init__()
        self.weight, self.gamma, self.alpha = weight, float(gamma), alpha

    def forward(self, outputs):
        logits, t = _patch_pair(outputs, "PatchFocalLoss")
        p = torch.sigmoid(logits)
        logp, log1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
        pos = -t * (1 - p) ** self.gamma * logp
        neg = -(1 - t) * p ** self.gamma * log1mp
        if self.alpha is not None:
            pos, neg = self.alpha * pos, (1 - self.alpha) * neg
        return (pos + neg).mean()


@LOSSES.register(path="models.heads.dmad")
class PatchBCELoss(nn.Module):
    """Binary cross-entropy on patch logits vs (soft) patch targets; ``pos_weight`` optional."""

    def __init__(self, weight=1.0, pos_weight=None):
        super().__init__()
        self.weight = weight
        self.pos_weight = pos_weight

    def forward(self, outputs):
        logits, t = _patch_pair(outputs, "PatchBCELoss")
        pw = None if self.pos_weight is None else torch.tensor(float(self.pos_weight),
                                                               device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw)


class Criterion(nn.Module):
    """Weighted sum of the configured losses; also reports each term for logging."""

    def __init__(self, cfg_list):
        super().__init__()
        self.terms = nn.ModuleDict()
        for i, entry in enumerate(cfg_list or []):
            try:
                cls = LOSSES.get(entry["type"])
            except KeyError as exc:
                raise UserError(f"criterion.{i}: {exc.args[0]}") from None
            try:
                self.terms[entry.get("name", entry["type"])] = cls(**(entry.get("kwargs") or {}))
            except TypeError as exc:
                raise UserError(f"criterion.{i} ({entry['type']}): {exc}") from None
        if not self.terms:
            raise UserError("criterion: at least one loss is required")

    def forward(self, outputs):
        parts = {name: term(outputs) for name, term in self.terms.items()}
        total = sum(term.weight * parts[name] for name, term in self.terms.items())
        return total, parts


@LOSSES.register(path="models.losses")
class DMADHingeLoss(nn.Module):
    """SimpleNet's hinge loss as DMAD's reference code uses it, on anomaly logits l = -s:
    mean(relu(margin + l_normal)) + mean(relu(margin - l_fake))
    + real_weight * mean(relu(margin - l_real)); each term averaged over its own patches, an
    empty term (no real anomalies in the unsupervised setting) counts 0."""

    def __init__(self, weight=1.0, margin=0.5, real_weight=10.0):
        super().__init__()
        self.weight, self.margin, self.real_weight = weight, float(margin), float(real_weight)

    def forward(self, outputs):
        if "hinge_normal" not in outputs:
            raise KeyError("DMADHingeLoss: no 'hinge_normal' in the outputs; it needs the "
                           "head models.heads.DMADReference in training mode")

        def term(x, sign):
            x = x.float()
            return torch.relu(self.margin + sign * x).mean() if x.numel() else x.sum()

        return (term(outputs["hinge_normal"], 1) + term(outputs["hinge_fake"], -1)
                + self.real_weight * term(outputs["hinge_real"], -1))
