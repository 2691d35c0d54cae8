"""Dropout whose keep-mask costs a tenth of ``torch.bernoulli_`` on CPU.

On CPU, ``F.dropout`` draws one Bernoulli sample per element and was 15% of a UniAD training
step (attention-weight dropout on B x heads x L x L maps). Here the mask comes from 16-bit
slices of full-range 64-bit integers (``random_``, one draw per four elements): an element is
kept when its 16-bit value is at or above ``t = round(p * 65536)``, so the drop probability is
``t / 65536`` (p quantised to 1/65536: 0.1 -> 0.1000061) and kept values are scaled by
``65536 / (65536 - t)``, which keeps the layer unbiased for the drop rate actually used. The
mask is stored as bool (a quarter of a float mask) for the backward pass. Masks follow
``torch.manual_seed`` like any other draw. On CUDA (fused kernels) and for p outside (0, 1) the
standard ``F.dropout`` runs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

_LEVELS = 65536


def keep_mask(shape, p, device):
    """Bool mask, True with probability 1 - round(p * 65536) / 65536, and the matching scale."""
    drop = round(p * _LEVELS)
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    # int16 view of uniform 64-bit words: uniform on [-32768, 32767]
    keep = words.view(torch.int16)[:n].view(shape) >= drop - _LEVELS // 2
    return keep, _LEVELS / (_LEVELS - drop)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


def fast_dropout(x, p, training=True):
    """``F.dropout(x, p, training)`` with the cheap CPU mask (see module doc)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or not 0 < p < 1:
        return F.dropout(x, p, training)
    keep, scale = keep_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, keep, scale)


class _SoftmaxKeep(torch.autograd.Function):
    """softmax(scores) * keep in one node: two passes over the (B*H, L, L) maps, not four."""

    @staticmethod
    def forward(ctx, scores, keep):
        weights = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(weights, keep)
        return weights * keep

    @staticmethod
    def backward(ctx, grad):
        weights, keep = ctx.saved_tensors
        return torch._softmax_backward_data(grad * keep, weights, -1, weights.dtype), None


def softmax_dropout(scores, p):
    """Dropout(softmax(scores, -1)) on CPU, *unscaled*: returns (kept weights, scale); the
    caller multiplies by ``scale`` wherever it is cheapest (attention: on V, L/d_head times
    smaller than the weights)."""
    if not 0 < p < 1 or scores.device.type != "cpu":
        raise ValueError(f"softmax_dropout is the CPU path for 0 < p < 1, got p={p} on "
                         f"{scores.device.type}")
    keep, scale = keep_mask(scores.shape, p, scores.device)
    return _SoftmaxKeep.apply(scores, keep), scale


class FastDropout(nn.Dropout):
    """Drop-in ``nn.Dropout``; ``fast = False`` makes it the standard one (reference path)."""

    fast = True

    def forward(self, x):
        if self.fast:
            return fast_dropout(x, self.p, self.training)
        return super().forward(x)
