"""UniAD feature reconstruction (You et al., NeurIPS 2022), faithful to the public code.

Feature jitter during training, a neighbour-masked transformer with layer-wise learned queries,
and the anomaly map as the per-position L2 reconstruction error upsampled to the input size.
"""
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualmem.models.initializer import initialize_from_cfg
from dualmem.models.reconstructions.transformer import Transformer, build_position_embedding
from dualmem.models.registry import MODELS
from dualmem.utils.errors import UserError


def add_feature_jitter(tokens, scale, prob, generator=None):
    """UniAD: with probability ``prob`` add N(0,1) * (token L2 norm / C) * scale per token."""
    if random.random() > prob:
        return tokens
    c = tokens.shape[-1]
    norms = tokens.norm(dim=-1, keepdim=True) / c
    noise = torch.randn(tokens.shape, device=tokens.device, dtype=tokens.dtype,
                        generator=generator)
    return tokens + noise * norms * scale


class FeatureReconstruction(nn.Module):
    """Shared plumbing: tokens in, reconstructed features and the anomaly map out."""

    def __init__(self, inplanes, instrides, feature_size, hidden_dim, pos_embed_type,
                 feature_jitter):
        super().__init__()
        if len(inplanes) != 1 or len(instrides) != 1:
            raise UserError(f"{type(self).__name__} expects one input map (an MFCN neck before "
                             f"it), got inplanes={inplanes} instrides={instrides}")
        self.inplanes, self.instrides = list(inplanes), list(instrides)
        self.feature_size = list(feature_size)
        self.feature_jitter = dict(feature_jitter) if feature_jitter else None
        self.pos_embed = build_position_embedding(pos_embed_type, feature_size, hidden_dim)
        self.input_proj = nn.Linear(inplanes[0], hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, inplanes[0])

    def tokens_in(self, feature_align):
        if tuple(feature_align.shape[-2:]) != tuple(self.feature_size):
            raise UserError(f"{type(self).__name__}: feature map is "
                             f"{tuple(feature_align.shape[-2:])}, the model was built for "
                             f"{tuple(self.feature_size)} (input_size / stride)")
        tokens = feature_align.flatten(2).transpose(1, 2)  # B, HW, C
        if self.training and self.feature_jitter:
            tokens = add_feature_jitter(tokens, self.feature_jitter.get("scale", 20.0),
                                        self.feature_jitter.get("prob", 1.0))
        return self.input_proj(tokens)

    def outputs(self, decoded, feature_align):
        b = decoded.shape[0]
        h, w = self.feature_size
        feature_rec = self.output_proj(decoded).transpose(1, 2).reshape(b, -1, h, w)
        return self.compare(feature_rec, feature_align)

    def compare(self, feature_rec, feature_align):
        """Anomaly map from the (rec, target) pair; a subclass may transform the pair first
        (DuMeNet's optional sigmoid squashing)."""
        pred = torch.sqrt(((feature_rec - feature_align) ** 2).sum(dim=1, keepdim=True))
        pred = F.interpolate(pred, scale_factor=self.instrides[0], mode="bilinear",
                             align_corners=True)
        return {"feature_rec": feature_rec, "feature_align": feature_align, "pred": pred}

    def get_outplanes(self):
        return self.inplanes

    def get_outstrides(self):
        return self.instrides


@MODELS.register(path="models.reconstructions")
class UniAD(FeatureReconstruction):
    def __init__(self, inplanes, instrides, feature_size, hidden_dim=256, pos_embed_type="learned",
                 nhead=8, num_encoder_layers=4, num_decoder_layers=4, dim_feedforward=1024,
                 dropout=0.1, activation="relu", normalize_before=False,
                 feature_jitter=None, neighbor_mask=None, initializer=None, save_recon=None,
                 attn_impl="sdpa"):
        super().__init__(inplanes, instrides, feature_size, hidden_dim, pos_embed_type,
                         feature_jitter)
        self.transformer = Transformer(hidden_dim, feature_size, neighbor_mask, nhead,
                                       num_encoder_layers, num_decoder_layers, dim_feedforward,
                                       dropout, activation, normalize_before)
        self.transformer.set_attn_impl(attn_impl)
        if save_recon:
            raise UserError("save_recon is not supported; use tools/predict.py for outputs")
        initialize_from_cfg(self, initializer)

    def forward(self, input):
        feature_align = input["feature_align"]
        tokens = self.tokens_in(feature_align)
        decoded, _ = self.transformer(tokens, self.pos_embed())
        return self.outputs(decoded, feature_align)
