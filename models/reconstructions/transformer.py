"""UniAD's transformer: post-norm encoder, decoder with a learned query per layer, 7x7 mask.

Tokens are batch-first (B, L, C) and attention runs through ``F.scaled_dot_product_attention``
with the neighbour mask built once as a buffer. Parameter names match ``nn.MultiheadAttention``
(``in_proj_weight``, ``in_proj_bias``, ``out_proj``) so UniAD checkpoints load unchanged.

In training on CPU, dropout (of activations and of attention weights) draws its masks with
:mod:`models.layers.fast_dropout`, and the attention runs through :mod:`models.layers.chunked_attention`
(softmax, dropout and the two batched matmuls a few heads at a time, in cache) instead of SDPA's
math path (which draws with ``bernoulli_`` and makes every (B*H, L, L) map in main memory);
evaluation and dropout-free training use SDPA.

``attn_impl: reference`` runs the same weights the way the UniAD code does (sequence-first
``F.multi_head_attention_forward`` with a float -inf mask rebuilt by loops every forward, the
standard dropout, and ``need_weights`` left at its default, True, as UniAD's calls leave it,
which takes the explicit softmax path and also averages the weights over heads); it exists so
``tools/benchmark.py --compare`` can measure the fast path against it.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualmem.models.layers.chunked_attention import attention_dropout
from dualmem.models.layers.fast_dropout import FastDropout, relu_dropout_
from dualmem.utils.errors import UserError


def neighbor_mask_loops(feature_size, neighbor_size):
    """UniAD's construction, kept for the reference-style path (rebuilt every forward there)."""
    h, w = feature_size
    hm, wm = neighbor_size
    mask = torch.ones(h, w, h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            mask[i, j, max(i - hm // 2, 0):min(i + hm // 2 + 1, h),
                 max(j - wm // 2, 0):min(j + wm // 2 + 1, w)] = False
    return mask.view(h * w, h * w)


def neighbor_mask(feature_size, neighbor_size):
    """Boolean (HW, HW) mask, True where attention is allowed: outside the k x k neighbourhood."""
    h, w = feature_size
    hm, wm = neighbor_size
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    near = ((ys[:, None] - ys[None, :]).abs() <= hm // 2) & \
           ((xs[:, None] - xs[None, :]).abs() <= wm // 2)
    allowed = ~near
    if not allowed.any(dim=1).all():
        raise UserError(f"neighbor_mask {list(neighbor_size)} covers the whole "
                         f"{h}x{w} feature map for some tokens: nothing left to attend to; "
                         f"use a smaller neighbor_size or a larger input")
    return allowed


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention on SDPA, weight-compatible with nn.MultiheadAttention."""

    def __init__(self, dim, num_heads, dropout=0.0):
        super().__init__()
        self.impl = "sdpa"
        if dim % num_heads:
            raise UserError(f"hidden_dim {dim} is not divisible by nhead {num_heads}")
        self.dim, self.num_heads, self.dropout = dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, attn_mask=None):
        if self.impl == "reference":
            return self._reference(query, key, value, attn_mask)
        b, lq, c = query.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        h = self.num_heads
        if b > 1 and query.stride(0) == 0:  # one query for the whole batch: project it once
            q = F.linear(query[0], wq, bq).expand(b, -1, -1)
        else:
            q = F.linear(query, wq, bq)
        q = q.view(b, lq, h, c // h).transpose(1, 2)
        k = F.linear(key, wk, bk).view(b, key.shape[1], h, c // h).transpose(1, 2)
        v = F.linear(value, wv, bv).view(b, value.shape[1], h, c // h).transpose(1, 2)
        if self.training and self.dropout > 0 and q.device.type == "cpu":
            out = self._attend_fast_dropout(q, k, v, attn_mask)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, c))

    def _attend_fast_dropout(self, q, k, v, attn_mask):
        """SDPA's math with the dropout of :mod:`models.layers.chunked_attention`; (B, H, L, D) in
        and out."""
        b, h, lq, d = q.shape
        additive = None
        if attn_mask is not None:  # bool "allowed" -> additive 0 / -inf
            additive = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
            additive.masked_fill_(~attn_mask, float("-inf"))
        out = attention_dropout(q.reshape(b * h, lq, d), k.reshape(b * h, -1, d),
                                v.reshape(b * h, -1, d), additive, self.dropout)
        return out.view(b, h, lq, d)

    def _reference(self, query, key, value, attn_mask):
        float_mask = None
        if attn_mask is not None:  # bool "allowed" -> UniAD's additive -inf mask
            float_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            float_mask.masked_fill_(~attn_mask, float("-inf"))
        out, _ = F.multi_head_attention_forward(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), self.dim,
            self.num_heads, self.in_proj_weight, self.in_proj_bias, None, None, False,
            self.dropout, self.out_proj.weight, self.out_proj.bias, training=self.training,
            need_weights=True, attn_mask=float_mask)  # UniAD's call leaves the default: True
        return out.transpose(0, 1)


def _activation(name):
    acts = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in acts:
        raise UserError(f"activation must be one of {list(acts)}, got '{name}'")
    return acts[name]


class FeedForward(nn.Module):
    def __init__(self, dim, hidden, dropout, activation):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.dropout = FastDropout(dropout)
        self.linear2 = nn.Linear(hidden, dim)
        self.activation = _activation(activation)

    def forward(self, x):
        if self.activation is F.relu and self.dropout.fast:
            return self.linear2(relu_dropout_(self.linear1(x), self.dropout.p, self.training))
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class TransformerEncoderLayer(nn.Module):
    def __init__(self, dim, nhead, dim_feedforward, dropout, activation, normalize_before):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, nhead, dropout)
        self.ffn = FeedForward(dim, dim_feedforward, dropout, activation)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = FastDropout(dropout), FastDropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, src, pos, mask=None):
        if self.normalize_before:
            x = self.norm1(src)
            src = src + self.dropout1(self.self_attn(x + pos, x + pos, x, mask))
            return src + self.dropout2(self.ffn(self.norm2(src)))
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, src + pos, src, mask)))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class TransformerDecoderLayer(nn.Module):
    """UniAD decoder layer: its own learned query attends to the encoder memory, then to the
    previous layer's output. A caller may pass ``query`` (DuMeNet's memory read-out) instead."""

    def __init__(self, dim, num_queries, nhead, dim_feedforward, dropout, activation,
                 normalize_before):
        super().__init__()
        self.learned_embed = nn.Embedding(num_queries, dim)
        self.self_attn = MultiheadAttention(dim, nhead, dropout)
        self.multihead_attn = MultiheadAttention(dim, nhead, dropout)
        self.ffn = FeedForward(dim, dim_feedforward, dropout, activation)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2, self.dropout3 = (FastDropout(dropout) for _ in range(3))
        self.normalize_before = normalize_before

    def forward(self, out, memory, pos, tgt_mask=None, memory_mask=None, query=None):
        # the learned query is the same for every image: kept (L, d) and expanded, so its
        # projection in the first attention is computed once, not once per image
        tgt = self.learned_embed.weight if query is None else query
        batch = memory.shape[0]

        def with_pos(t):
            return (t + pos).expand(batch, -1, -1) if t.dim() == 2 else t + pos

        if self.normalize_before:
            t = self.norm1(tgt)
            tgt = tgt + self.dropout1(self.self_attn(with_pos(t), memory + pos, memory, tgt_mask))
            t = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.multihead_attn(t + pos, out + pos, out, memory_mask))
            return tgt + self.dropout3(self.ffn(self.norm3(tgt)))
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(with_pos(tgt), memory + pos, memory,
                                                            tgt_mask)))
        tgt = self.norm2(tgt + self.dropout2(self.multihead_attn(tgt + pos, out + pos, out,
                                                                 memory_mask)))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class Transformer(nn.Module):
    def __init__(self, hidden_dim, feature_size, neighbor_mask_cfg, nhead, num_encoder_layers,
                 num_decoder_layers, dim_feedforward, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        num_queries = feature_size[0] * feature_size[1]
        enc = TransformerEncoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation,
                                      normalize_before)
        dec = TransformerDecoderLayer(hidden_dim, num_queries, nhead, dim_feedforward, dropout,
                                      activation, normalize_before)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(enc) for _ in range(num_encoder_layers))
        self.encoder_norm = nn.LayerNorm(hidden_dim) if normalize_before else None
        self.decoder_layers = nn.ModuleList(copy.deepcopy(dec) for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.use_mask = [False, False, False]
        if neighbor_mask_cfg:
            self.use_mask = [bool(m) for m in neighbor_mask_cfg.get("mask", [True] * 3)]
            if len(self.use_mask) != 3:
                raise UserError("neighbor_mask.mask must have 3 booleans [enc, dec1, dec2]")
            size = neighbor_mask_cfg.get("neighbor_size", [7, 7])
            self.feature_size, self.neighbor_size = tuple(feature_size), tuple(size)
            self.register_buffer("mask", neighbor_mask(feature_size, size), persistent=False)
        else:
            self.mask = None

    def set_attn_impl(self, impl):
        """'sdpa' (default: mask built once, fast dropout) or 'reference' (UniAD-style, see
        module doc)."""
        if impl not in ("sdpa", "reference"):
            raise UserError(f"attn_impl must be 'sdpa' or 'reference', got '{impl}'")
        self.attn_impl = impl
        for module in self.modules():
            if isinstance(module, MultiheadAttention):
                module.impl = impl
            elif isinstance(module, FastDropout):
                module.fast = impl == "sdpa"

    def _masks(self):
        """(encoder, decoder self, decoder cross) masks for one pass; the reference path
        rebuilds the mask with UniAD's loops once per call, as UniAD does per forward."""
        if not any(self.use_mask):
            return None, None, None
        mask = self.mask
        if getattr(self, "attn_impl", "sdpa") == "reference":
            mask = neighbor_mask_loops(self.feature_size, self.neighbor_size).to(mask.device)
        return tuple(mask if use else None for use in self.use_mask)

    def encode(self, src, pos):
        mask = self._masks()[0]
        for layer in self.encoder_layers:
            src = layer(src, pos, mask)
        return self.encoder_norm(src) if self.encoder_norm is not None else src

    def decode(self, memory, pos, query=None, continuous_query=True):
        """``query`` replaces the learned per-layer queries: at every layer when
        ``continuous_query`` (DuMeNet), else only at the first (the reference code)."""
        _, self_mask, cross_mask = self._masks()
        out = memory
        for i, layer in enumerate(self.decoder_layers):
            q = query if (query is not None and (continuous_query or i == 0)) else None
            out = layer(out, memory, pos, self_mask, cross_mask, query=q)
        return self.decoder_norm(out)

    def forward(self, src, pos):
        memory = self.encode(src, pos)
        return self.decode(memory, pos), memory


class PositionEmbeddingSine(nn.Module):
    def __init__(self, feature_size, num_pos_feats, temperature=10000, normalize=True):
        super().__init__()
        h, w = feature_size
        ones = torch.ones(h, w)
        y = ones.cumsum(0)
        x = ones.cumsum(1)
        if normalize:
            scale = 2 * math.pi
            y = y / (y[-1:, :] + 1e-6) * scale
            x = x / (x[:, -1:] + 1e-6) * scale
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        px, py = x[:, :, None] / dim_t, y[:, :, None] / dim_t
        px = torch.stack((px[:, :, 0::2].sin(), px[:, :, 1::2].cos()), dim=3).flatten(2)
        py = torch.stack((py[:, :, 0::2].sin(), py[:, :, 1::2].cos()), dim=3).flatten(2)
        self.register_buffer("pos", torch.cat((py, px), dim=2).flatten(0, 1), persistent=False)

    def forward(self):
        return self.pos


class PositionEmbeddingLearned(nn.Module):
    def __init__(self, feature_size, num_pos_feats):
        super().__init__()
        self.feature_size = tuple(feature_size)
        self.row_embed = nn.Embedding(feature_size[0], num_pos_feats)
        self.col_embed = nn.Embedding(feature_size[1], num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self):
        h, w = self.feature_size
        x = self.col_embed.weight.unsqueeze(0).expand(h, -1, -1)
        y = self.row_embed.weight.unsqueeze(1).expand(-1, w, -1)
        return torch.cat([x, y], dim=-1).flatten(0, 1)


def build_position_embedding(kind, feature_size, hidden_dim):
    if kind in ("sine", "v2"):
        return PositionEmbeddingSine(feature_size, hidden_dim // 2)
    if kind in ("learned", "v3"):
        return PositionEmbeddingLearned(feature_size, hidden_dim // 2)
    raise UserError(f"pos_embed_type must be 'learned' or 'sine', got '{kind}'")
