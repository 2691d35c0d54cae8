"""Dropout whose keep-mask costs a tenth of ``torch.bernoulli_`` on CPU.

On CPU, ``F.dropout`` draws one Bernoulli sample per element and was 15% of a UniAD training
step (attention-weight dropout on B x heads x L x L maps). Here the mask comes from 16-bit
slices of full-range 64-bit integers (``random_``, one draw per four elements): an element is
kept when its 16-bit value is at or above ``t = round(p * 65536)``, so the drop probability is
``t / 65536`` (p quantised to 1/65536: 0.1 -> 0.1000061) and kept values are scaled by
``65536 / (65536 - t)``, which keeps the layer unbiased for the drop rate actually used. The
mask is turned into the input's dtype once and reused by the backward pass (multiplying by a
bool mask casts it again on every use). Masks follow ``torch.manual_seed`` like any other
draw. On CUDA (fused kernels) and for p outside (0, 1) the standard ``F.dropout`` runs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

_LEVELS = 65536


def keep_scale(p):
    """1 / (1 - the drop rate actually used)."""
    return _LEVELS / (_LEVELS - round(p * _LEVELS))


def keep_mask(shape, p, device):
    """Bool mask, True with probability 1 - round(p * 65536) / 65536, and the matching scale."""
    drop = round(p * _LEVELS)
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    # int16 view of uniform 64-bit words: uniform on [-32768, 32767]
    keep = words.view(torch.int16)[:n].view(shape) >= drop - _LEVELS // 2
    return keep, keep_scale(p)


def float_mask(shape, p, dtype, device, scaled=True):
    """:func:`keep_mask` as 0 / ``scale`` (or 0 / 1 when not ``scaled``) in ``dtype``."""
    keep, scale = keep_mask(shape, p, device)
    mask = keep.to(dtype)
    return mask.mul_(scale) if scaled else mask, scale


class _Masked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def fast_dropout(x, p, training=True):
    """``F.dropout(x, p, training)`` with the cheap CPU mask (see module doc)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or not 0 < p < 1:
        return F.dropout(x, p, training)
    mask, _ = float_mask(x.shape, p, x.dtype, x.device)
    return _Masked.apply(x, mask)


class _SoftmaxKeep(torch.autograd.Function):
    """softmax(scores) * mask in one node: the softmax output is kept for the backward pass
    once, and no scaled copy of the (B*H, L, L) maps is made."""

    @staticmethod
    def forward(ctx, scores, p):
        weights = torch.softmax(scores, dim=-1)
        mask, _ = float_mask(weights.shape, p, weights.dtype, weights.device, scaled=False)
        ctx.save_for_backward(weights, mask)
        return weights * mask

    @staticmethod
    def backward(ctx, grad):
        weights, mask = ctx.saved_tensors
        return torch._softmax_backward_data(grad * mask, weights, -1, weights.dtype), None


def softmax_dropout(scores, p):
    """Dropout(softmax(scores, -1)) on CPU, *unscaled*: returns (kept weights, scale); the
    caller multiplies by ``scale`` wherever it is cheapest (attention: on V, L/d_head times
    smaller than the weights)."""
    if not 0 < p < 1 or scores.device.type != "cpu":
        raise ValueError(f"softmax_dropout is the CPU path for 0 < p < 1, got p={p} on "
                         f"{scores.device.type}")
    return _SoftmaxKeep.apply(scores, p), keep_scale(p)


class FastDropout(nn.Dropout):
    """Drop-in ``nn.Dropout``; ``fast = False`` makes it the standard one (reference path)."""

    fast = True

    def forward(self, x):
        if self.fast:
            return fast_dropout(x, self.p, self.training)
        return super().forward(x)
