"""DuMeNet's two memories (channel and SSIM-based spatial), SSIM itself, and read-out fusion.

Both memories hold learnable "normal" patterns; an encoder token (channel memory) or an encoder
channel map (spatial memory) is replaced by a soft mixture of the slots it resembles, so the
decoder reconstructs from memorised normal content and anomalies are not copied through.

SSIM conventions (Wang et al. 2004, as scikit-image's ``structural_similarity`` with
``use_sample_covariance=False``): C1 = (0.01 L)^2, C2 = (0.03 L)^2 for a dynamic range ``L``;
population (co)variances. ``global``: one uniform window over the whole map. ``local``: a
Gaussian window (sigma 1.5) slid over the map's valid positions (the window lies fully inside
the map, which is what scikit-image's border crop keeps), averaged.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from dualmem.utils.errors import UserError

SSIM_MODES = ("global", "local")
FUSION_MODES = ("concat", "add", "multiply", "attention", "gate")


def _check_choice(name, value, valid):
    if value not in valid:
        raise UserError(f"{name} must be one of {list(valid)}, got {value!r}")


# ----------------------------------------------------------------------------- SSIM

def ssim_constants(data_range, k1=0.01, k2=0.03):
    """Wang et al.'s stabilisers for values spanning ``data_range``."""
    if not data_range > 0:
        raise UserError(f"SSIM data_range must be > 0, got {data_range!r}")
    return (k1 * data_range) ** 2, (k2 * data_range) ** 2


def ssim_kernel(map_size, mode="local", window=11, sigma=1.5, dtype=None, device=None):
    """Normalised (kh, kw) weights of one SSIM window on an (h, w) map.

    ``local``: Gaussian, each side clipped to the largest odd size that fits the map (a 7x7
    window on a 4x4 map becomes 3x3), so small maps still get a local SSIM. ``global``:
    uniform over the whole map."""
    _check_choice("ssim_mode", mode, SSIM_MODES)
    h, w = map_size
    if mode == "global":
        return torch.full((h, w), 1.0 / (h * w), dtype=dtype, device=device)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise UserError(f"ssim_window must be a positive odd integer, got {window!r}")
    if not sigma > 0:
        raise UserError(f"SSIM sigma must be > 0, got {sigma!r}")

    def taps(size):
        k = min(window, size if size % 2 else size - 1)
        x = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
        g = torch.exp(-x ** 2 / (2 * sigma ** 2))
        return g / g.sum()

    return torch.outer(taps(h), taps(w)).to(dtype=dtype or torch.get_default_dtype(),
                                             device=device)


def _local_stats(maps, kernel):
    """Weighted mean and variance of every window position: (M, P) each, via conv2d."""
    weight = kernel[None, None]
    x = maps.unsqueeze(1)
    mu = F.conv2d(x, weight).flatten(1)
    var = F.conv2d(x * x, weight).flatten(1) - mu * mu
    return mu, var


def _ssim_from_stats(mu_x, mu_y, var_x, var_y, exy2, c1, c2):
    """SSIM from window statistics; ``exy2`` = 2 E_w[x y]. Written so that each full-size
    (broadcast) tensor costs one pass: the pairwise form runs on Q x N x P elements."""
    lum_num = torch.addcmul(mu_x.new_tensor(c1), 2 * mu_x, mu_y)           # 2 mu_x mu_y + C1
    cs_num = (exy2 - lum_num).add_(c1 + c2)                                # 2 cov + C2
    den = (mu_x * mu_x + c1 + mu_y * mu_y) * (var_x + c2 + var_y)
    return lum_num * cs_num / den


def ssim(x, y, data_range, mode="local", window=11, sigma=1.5):
    """SSIM of matching map pairs: ``x``, ``y`` (..., h, w) with equal shapes -> (...)."""
    if x.shape != y.shape:
        raise UserError(f"ssim: x {tuple(x.shape)} and y {tuple(y.shape)} differ")
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    kernel = ssim_kernel((h, w), mode, window, sigma, x.dtype, x.device)
    x2, y2 = x.reshape(-1, h, w), y.reshape(-1, h, w)
    mu_x, var_x = _local_stats(x2, kernel)
    mu_y, var_y = _local_stats(y2, kernel)
    exy2 = F.conv2d((x2 * y2).unsqueeze(1), 2 * kernel[None, None]).flatten(1)
    smap = _ssim_from_stats(mu_x, mu_y, var_x, var_y, exy2, *ssim_constants(data_range))
    return smap.mean(-1).reshape(lead)


def _patches(maps, kh, kw):
    """(M, h, w) -> every kh x kw window, (P, M, K) with P positions and K = kh * kw taps.

    ``unfold`` when running; when traced for export, a gather with a constant index (the same
    values; the ONNX exporter cannot size ``unfold``'s input with a dynamic M). Training keeps
    ``unfold``: its backward sums in the order earlier results were measured with."""
    if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        m = maps.shape[0]
        return maps.unfold(1, kh, 1).unfold(2, kw, 1).reshape(m, -1, kh * kw).transpose(0, 1)
    h, w = (int(s) for s in maps.shape[-2:])
    dev = maps.device
    rows = torch.arange(h - kh + 1, device=dev)[:, None, None, None] + \
        torch.arange(kh, device=dev)[None, None, :, None]
    cols = torch.arange(w - kw + 1, device=dev)[None, :, None, None] + \
        torch.arange(kw, device=dev)[None, None, None, :]
    index = (rows * w + cols).reshape(-1, kh * kw)                    # (P, K) into h * w
    return maps.flatten(1)[:, index].transpose(0, 1)


def pairwise_ssim(queries, slots, data_range, mode="local", window=11, sigma=1.5, kernel=None):
    """SSIM of every query map against every slot map: (Q, h, w) x (N, h, w) -> (Q, N).
    ``kernel``: the window weights (``ssim_kernel``) when the caller holds them already.

    Means and variances come from conv2d, the slots' once. The cross term E_w[x y] of every
    (query, slot, position) is one batched matmul over positions of kernel-weighted query
    patches with slot patches, so the Q x N x h x w products are never materialised; the
    SSIM map is then a single (P, Q, N) pass."""
    if kernel is None:
        h, w = queries.shape[-2:]
        kernel = ssim_kernel((h, w), mode, window, sigma, queries.dtype, queries.device)
    kh, kw = kernel.shape
    mu_q, var_q = (t.t().unsqueeze(2) for t in _local_stats(queries, kernel))  # (P, Q, 1)
    mu_s, var_s = (t.t().unsqueeze(1) for t in _local_stats(slots, kernel))    # (P, 1, N)
    q_patches = _patches(queries, kh, kw) * (2 * kernel.reshape(-1))           # (P, Q, K)
    exy2 = torch.bmm(q_patches, _patches(slots, kh, kw).transpose(1, 2))        # (P, Q, N)
    smap = _ssim_from_stats(mu_q, mu_s, var_q, var_s, exy2, *ssim_constants(data_range))
    return smap.mean(0)


# ----------------------------------------------------------------------------- memories

class ChannelMemory(nn.Module):
    """N learnable d-dim slots read by scaled dot-product attention from each token.

    Q comes from the token, K and V from the slots (bias-free linears, as the reference), so the
    read-out is a convex mixture of (projected) memorised normal feature vectors."""

    def __init__(self, dim, num_slots=256, init_std=0.1):
        super().__init__()
        self.memory = nn.Parameter(torch.randn(num_slots, dim) * init_std)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, tokens):
        """(B, L, d) -> read-out (B, L, d) and attention over slots (B, L, N)."""
        q = self.q_proj(tokens)
        k, v = self.k_proj(self.memory), self.v_proj(self.memory)
        att = torch.softmax(q @ k.t() * self.scale, dim=-1)
        return att @ v, att


class SpatialMemory(nn.Module):
    """N learnable (h, w) slot maps matched by SSIM to every channel map of every image.

    Each channel's map is a query; its similarity to each slot is SSIM (structure, contrast and
    luminance, not raw dot products), softmax(SSIM / temperature) over slots weights the slot
    maps into the read-out. SSIM lies in [-1, 1], so at temperature 1 the softmax over 256
    slots is nearly uniform (weights within a factor e^2); the temperature (default 0.1) is
    learnable by default (stored as its log, so it stays positive).

    ``data_range`` is SSIM's L. The maps this module sees are encoder outputs, i.e. LayerNorm
    outputs of unit scale per token, so ~95% of values fall in +-2: L = 4 by default. Slots start
    as N(0, 1) to match that scale."""

    def __init__(self, map_size, num_slots=256, mode="local", window=11, sigma=1.5,
                 data_range=4.0, temperature=0.1, learn_temperature=True, init_std=1.0):
        super().__init__()
        _check_choice("ssim_mode", mode, SSIM_MODES)
        ssim_kernel(map_size, mode, window, sigma)  # validates window / sigma early
        ssim_constants(data_range)
        if not temperature > 0:
            raise UserError(f"spatial temperature must be > 0, got {temperature!r}")
        self.map_size = tuple(map_size)
        self.mode, self.window, self.sigma = mode, window, sigma
        self.data_range = float(data_range)
        self.slots = nn.Parameter(torch.randn(num_slots, *self.map_size) * init_std)
        # the window weights, made once (a constant of known shape when traced for export)
        self.register_buffer("ssim_window_kernel", ssim_kernel(self.map_size, mode, window, sigma,
                                                               torch.float32), persistent=False)
        log_t = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def similarity(self, maps):
        """(M, h, w) query maps -> SSIM against every slot, (M, N). Always float32: the
        variances are differences E[x^2] - mu^2 that half precision cannot resolve."""
        with torch.autocast(maps.device.type, enabled=False):
            return pairwise_ssim(maps.float(), self.slots.float(), self.data_range, self.mode,
                                 self.window, self.sigma, self.ssim_window_kernel)

    def forward(self, maps):
        """(B, C, h, w) -> read-out (B, C, h, w) and attention over slots (B, C, N)."""
        b, c, h, w = maps.shape
        if (h, w) != self.map_size:
            raise UserError(f"SpatialMemory built for {self.map_size} maps, got {(h, w)}")
        sim = self.similarity(maps.reshape(-1, *self.map_size))  # static h, w when traced
        att = torch.softmax(sim / self.log_temperature.exp(), dim=-1)
        out = att @ self.slots.flatten(1)
        return out.reshape(b, c, h, w), att.reshape(b, c, -1)


# ----------------------------------------------------------------------------- fusion

class ConcatFusion(nn.Module):
    """Linear(2d -> d) over both read-outs (the reference's default)."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, channel, spatial, tokens=None):
        return self.proj(torch.cat([channel, spatial], dim=-1))


class AddFusion(nn.Module):
    def forward(self, channel, spatial, tokens=None):
        return channel + spatial


class MultiplyFusion(nn.Module):
    def forward(self, channel, spatial, tokens=None):
        return channel * spatial


class GateFusion(nn.Module):
    """g = sigmoid(Linear(2d -> d)[ch; sp]); g * ch + (1 - g) * sp: a per-feature choice."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, channel, spatial, tokens=None):
        g = torch.sigmoid(self.proj(torch.cat([channel, spatial], dim=-1)))
        return g * channel + (1 - g) * spatial


class AttentionFusion(nn.Module):
    """Per-token attention of the encoder token over the two read-outs (our design; the
    reference names this mode but has none).

    The encoder token is the query and the two read-outs are keys and values:
    a = softmax_s(<Wq t, Wk r_s> / sqrt(d)) over s in {channel, spatial}, out = sum_s a_s r_s.
    Unlike ``gate`` (a per-feature mix decided by the read-outs), each position decides from
    its own content which memory to trust; without ``tokens`` the mean read-out is the query."""

    def __init__(self, dim):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)

    def weights(self, channel, spatial, tokens=None):
        """(B, L, 2) softmax weights of the (channel, spatial) streams."""
        streams = torch.stack([channel, spatial], dim=-2)                    # (B, L, 2, d)
        query = self.q_proj(streams.mean(-2) if tokens is None else tokens)  # (B, L, d)
        logits = (self.k_proj(streams) @ query.unsqueeze(-1)).squeeze(-1) * self.scale
        return torch.softmax(logits, dim=-1)

    def forward(self, channel, spatial, tokens=None):
        a = self.weights(channel, spatial, tokens)
        return a[..., :1] * channel + a[..., 1:] * spatial


def build_fusion(mode, dim):
    _check_choice("fusion_mode", mode, FUSION_MODES)
    return {"concat": lambda: ConcatFusion(dim), "add": AddFusion, "multiply": MultiplyFusion,
            "gate": lambda: GateFusion(dim), "attention": lambda: AttentionFusion(dim)}[mode]()
