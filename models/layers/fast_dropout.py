"""Dropout whose keep-mask costs a tenth of ``torch.bernoulli_`` on CPU.

On CPU, ``F.dropout`` draws one Bernoulli sample per element and was 15% of a UniAD training
step (attention-weight dropout on B x heads x L x L maps), and even ``random_``'s generator
(mt19937) runs on one core. Here the mask comes from 16-bit slices of 64-bit words made by
SplitMix64 (Steele, Lea and Flood 2014: a Weyl sequence ``seed + i * golden`` through a
multiply-xorshift finaliser), computed with vectorised integer tensor ops on every core; the
seed is one 64-bit draw from torch's default generator per mask, so masks follow
``torch.manual_seed`` and the RNG state that checkpoints save. An element is kept when its
16-bit value is at or above ``t = round(p * 65536)`` (shifted to the int16 range), so the drop
probability is ``t / 65536`` (p quantised to 1/65536: 0.1 -> 0.1000061) and kept values are
scaled by ``65536 / (65536 - t)``, which keeps the layer unbiased for the drop rate actually
used. The mask is made in the input's dtype once and reused by the backward pass (a bool mask
is cast again on every use). On CUDA (fused kernels) and for p outside (0, 1) the standard
``F.dropout`` runs.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_LEVELS = 65536


def keep_scale(p):
    """1 / (1 - the drop rate actually used)."""
    return _LEVELS / (_LEVELS - round(p * _LEVELS))


def threshold(p):
    """Keep an element when its uniform int16 value is at or above this."""
    return round(p * _LEVELS) - _LEVELS // 2


# SplitMix64's constants as signed int64 (torch has no uint64 arithmetic; products wrap)
_GOLDEN = 0x9E3779B97F4A7C15 - 2 ** 64
_MIX1 = 0xBF58476D1CE4E5B9 - 2 ** 64
_MIX2 = 0x94D049BB133111EB - 2 ** 64
_weyl = torch.empty(0, dtype=torch.int64)


def _weyl_steps(count):
    """``i * golden`` for i < count (CPU), kept and grown as needed: one pass saved per mask."""
    global _weyl
    if _weyl.numel() < count:
        _weyl = torch.arange(max(count, 2 * _weyl.numel()), dtype=torch.int64).mul_(_GOLDEN)
    return _weyl[:count]


def _xorshift_right(z, shift, scratch):
    """z ^= z >>> shift (logical shift: torch's >> on int64 is arithmetic, so mask it)."""
    torch.bitwise_right_shift(z, shift, out=scratch)
    return z.bitwise_xor_(scratch.bitwise_and_((1 << (64 - shift)) - 1))


def splitmix64(seed, count, device, out=None, scratch=None):
    """SplitMix64 outputs ``mix(seed + (i + 1) * golden)`` for i < count, as int64 bit
    patterns; ``out`` and ``scratch`` (int64, at least ``count`` long) are reused when given."""
    out = torch.empty(count, dtype=torch.int64, device=device) if out is None else out[:count]
    scratch = torch.empty_like(out) if scratch is None else scratch[:count]
    if out.device.type == "cpu":
        torch.add(_weyl_steps(count + 1)[1:], seed, out=out)
    else:
        torch.arange(1, count + 1, device=device, out=out).mul_(_GOLDEN).add_(seed)
    _xorshift_right(out, 30, scratch).mul_(_MIX1)
    _xorshift_right(out, 27, scratch).mul_(_MIX2)
    return _xorshift_right(out, 31, scratch)


def draw_seed(device="cpu"):
    """One 64-bit draw from torch's default generator for ``device``."""
    return int(torch.empty((), dtype=torch.int64, device=device).random_(-2 ** 63, None))


# eager inside torch.compile: AOT autograd mishandles the int64 -> int16 view of a graph
# intermediate, and eager draws stay identical to those of an uncompiled run
@torch.compiler.disable
def uniform16(n, device, words=None, scratch=None):
    """``n`` uniform int16 values: the four 16-bit slices of ``ceil(n / 4)`` SplitMix64 words
    under a fresh seed; ``words`` and ``scratch`` (int64 buffers) are reused when given."""
    count = (n + 3) // 4
    return splitmix64(draw_seed(device), count, device, words, scratch).view(torch.int16)[:n]


def keep_mask(shape, p, device):
    """Bool mask, True with probability 1 - round(p * 65536) / 65536, and the matching scale."""
    n = math.prod(shape)
    return uniform16(n, device).view(shape) >= threshold(p), keep_scale(p)


def float_mask(shape, p, dtype, device):
    """:func:`keep_mask` as 0 / ``scale`` in ``dtype``, and the scale; the comparison writes
    ``dtype`` directly (a bool mask and a cast cost five times more)."""
    mask = torch.empty(shape, dtype=dtype, device=device)
    torch.ge(uniform16(mask.numel(), device).view(shape), threshold(p), out=mask)
    scale = keep_scale(p)
    return mask.mul_(scale), scale


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


class _ReluMaskedInPlace(torch.autograd.Function):
    """relu(h) * mask written over h (a fresh linear output nobody else reads). Its backward
    needs no mask: the output is positive exactly where h > 0 and the element was kept, and
    there the derivative is the keep scale."""

    @staticmethod
    def forward(ctx, h, mask, scale):
        out = h.relu_().mul_(mask)
        ctx.mark_dirty(h)
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0).mul_(ctx.scale), None, None


def relu_dropout_(h, p, training=True):
    """``F.dropout(F.relu(h), p, training)``, in place on CPU with the cheap mask: one tensor
    and one pass fewer than the two layers, and no mask kept for the backward pass. ``h`` must
    be a fresh result (a linear layer's output) that nothing else uses."""
    if not training or p == 0 or h.device.type != "cpu" or not 0 < p < 1:
        return F.dropout(F.relu(h), p, training)
    mask, scale = float_mask(h.shape, p, h.dtype, h.device)
    return _ReluMaskedInPlace.apply(h, mask, scale)


class FastDropout(nn.Dropout):
    """Drop-in ``nn.Dropout``; ``fast = False`` makes it the standard one (reference path)."""

    fast = True

    def forward(self, x):
        if self.fast:
            return fast_dropout(x, self.p, self.training)
        return super().forward(x)
