"""DuMeNet: SSIM against scikit-image and a float64 brute force, the two memories, fusion, and
UniADMemory's modes (gradients reach exactly the memories in use)."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualmem import models  # noqa: F401  (registers everything)
from conftest import tiny_net
from dualmem.models.model_builder import ModelHelper
from dualmem.models.reconstructions.memory import (FUSION_MODES, AttentionFusion, ChannelMemory,
                                           GateFusion, SpatialMemory, build_fusion,
                                           pairwise_ssim, ssim, ssim_kernel)
from dualmem.models.reconstructions.uniad_memory import MEMORY_MODES, UniADMemory
from dualmem.models.registry import MODELS

structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity

# ----------------------------------------------------------------------------- SSIM


def brute_force_ssim(x, y, data_range, window, sigma=1.5):
    """float64 loops over every window position fully inside the map; ``window=None``: one
    uniform window over the whole map (global SSIM)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h, w = x.shape
    if window is None:
        kh, kw, g = h, w, np.full((h, w), 1.0 / (h * w))
    else:
        kh = min(window, h if h % 2 else h - 1)
        kw = min(window, w if w % 2 else w - 1)
        gy = np.exp(-(np.arange(kh) - (kh - 1) / 2) ** 2 / (2 * sigma ** 2))
        gx = np.exp(-(np.arange(kw) - (kw - 1) / 2) ** 2 / (2 * sigma ** 2))
        g = np.outer(gy / gy.sum(), gx / gx.sum())
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(h - kh + 1):
        for j in range(w - kw + 1):
            a, b = x[i:i + kh, j:j + kw], y[i:i + kh, j:j + kw]
            ma, mb = (g * a).sum(), (g * b).sum()
            va, vb = (g * (a - ma) ** 2).sum(), (g * (b - mb) ** 2).sum()
            cov = (g * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) /
                          ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def map_pairs(shape, n, seed):
    """Pairs from unrelated to strongly related (scaled, shifted, noisy copies)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g) * 1.5 + 0.3
    a = torch.linspace(-1.0, 1.0, n).view(n, 1, 1)
    noise = torch.randn(n, *shape, generator=g) * torch.linspace(3.0, 0.05, n).view(n, 1, 1)
    return x, a * x + 0.5 * (1 - a) + noise


@pytest.mark.parametrize("shape", [(16, 16), (13, 17)])
def test_local_ssim_matches_scikit_image(shape):
    x, y = map_pairs(shape, 6, seed=1)
    ours = ssim(x, y, data_range=4.0, mode="local", window=11)
    pair = pairwise_ssim(x, y, data_range=4.0, mode="local", window=11)
    for i in range(len(x)):
        ref = structural_similarity(x[i].double().numpy(), y[i].double().numpy(), data_range=4.0,
                                    gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)
        assert pair[i, i].item() == pytest.approx(ref, abs=1e-4)
    assert -1 < ours.min() < 0.2 and ours.max() > 0.8  # the pairs span the range


def test_global_ssim_matches_scikit_image_whole_map_window():
    # a uniform window as large as an odd square map leaves one position: the global SSIM
    x, y = map_pairs((9, 9), 6, seed=2)
    ours = ssim(x, y, data_range=6.0, mode="global")
    for i in range(len(x)):
        ref = structural_similarity(x[i].double().numpy(), y[i].double().numpy(), data_range=6.0,
                                    win_size=9, use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("mode, window, shape", [
    ("local", 7, (14, 14)), ("local", 11, (14, 14)), ("local", 7, (4, 4)), ("local", 5, (6, 9)),
    ("global", 11, (14, 14)), ("global", 11, (5, 8))])
def test_ssim_matches_float64_brute_force(mode, window, shape):
    x, y = map_pairs(shape, 5, seed=3)
    ours = ssim(x, y, data_range=4.0, mode=mode, window=window)
    for i in range(len(x)):
        ref = brute_force_ssim(x[i], y[i], 4.0, window if mode == "local" else None)
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("mode", ["global", "local"])
def test_pairwise_ssim_is_every_pair(mode):
    q, _ = map_pairs((10, 12), 7, seed=4)
    s, _ = map_pairs((10, 12), 5, seed=5)
    pair = pairwise_ssim(q, s, data_range=4.0, mode=mode, window=7)
    assert pair.shape == (7, 5)
    expected = ssim(q[:, None].expand(-1, 5, -1, -1), s[None].expand(7, -1, -1, -1),
                    data_range=4.0, mode=mode, window=7)
    assert torch.allclose(pair, expected, atol=1e-5)
    self_sim = pairwise_ssim(q, q, data_range=4.0, mode=mode, window=7).diagonal()
    assert torch.allclose(self_sim, torch.ones(7), atol=1e-5)


def test_ssim_kernel_clipping_and_errors():
    assert ssim_kernel((14, 14), "local", 11).shape == (11, 11)
    assert ssim_kernel((4, 6), "local", 7).shape == (3, 5)
    assert ssim_kernel((4, 6), "local", 7).sum().item() == pytest.approx(1.0)
    assert ssim_kernel((4, 6), "global").shape == (4, 6)
    with pytest.raises(ValueError, match="positive odd"):
        ssim_kernel((14, 14), "local", 8)
    with pytest.raises(ValueError, match=r"\['global', 'local'\]"):
        ssim_kernel((14, 14), "gaussian", 7)
    with pytest.raises(ValueError, match="data_range"):
        ssim(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), data_range=0.0)


# ----------------------------------------------------------------------------- memories


@pytest.mark.parametrize("mode", ["global", "local"])
def test_spatial_memory_prefers_the_identical_slot(mode):
    torch.manual_seed(0)
    mem = SpatialMemory((6, 7), num_slots=11, mode=mode, window=5)
    maps = torch.randn(2, 3, 6, 7)
    target = torch.tensor([[7, 2, 9], [0, 4, 10]])  # slot holding each query's map
    with torch.no_grad():
        mem.slots[target.flatten()] = maps.flatten(0, 1)
    out, att = mem(maps)
    assert out.shape == maps.shape and att.shape == (2, 3, 11)
    assert torch.allclose(att.sum(-1), torch.ones(2, 3), atol=1e-6)
    assert torch.equal(att.argmax(-1), target)
    assert torch.allclose(out, torch.einsum("bcn,nhw->bchw", att, mem.slots), atol=1e-5)
    sim = mem.similarity(maps.flatten(0, 1))
    assert torch.allclose(sim[torch.arange(6), target.flatten()], torch.ones(6), atol=1e-5)
    # lower temperature -> sharper choice of the same slot
    with torch.no_grad():
        mem.log_temperature.fill_(np.log(0.01))
    sharp = mem(maps)[1]
    assert (sharp.max(-1).values > att.max(-1).values).all()


def test_spatial_memory_ssim_stays_float32_under_autocast():
    torch.manual_seed(0)
    mem = SpatialMemory((6, 6), num_slots=5, mode="local", window=5)
    maps = torch.randn(2, 3, 6, 6) + 3.0  # an offset: E[x^2] - mu^2 loses bits in bf16
    ref = mem.similarity(maps.flatten(0, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = mem.similarity(maps.flatten(0, 1))
        mem(maps)
    assert sim.dtype == torch.float32 and torch.equal(sim, ref)


def test_spatial_memory_temperature_fixed_or_learned():
    assert isinstance(SpatialMemory((4, 4), 3).log_temperature, torch.nn.Parameter)
    fixed = SpatialMemory((4, 4), 3, learn_temperature=False)
    assert "log_temperature" not in dict(fixed.named_parameters())
    assert "log_temperature" in fixed.state_dict()
    with pytest.raises(ValueError, match="temperature"):
        SpatialMemory((4, 4), 3, temperature=0.0)


def test_channel_memory_is_scaled_dot_product_attention_over_slots():
    torch.manual_seed(0)
    mem = ChannelMemory(16, num_slots=9)
    assert mem.memory.std().item() == pytest.approx(0.1, rel=0.2)
    assert all(m.bias is None for m in (mem.q_proj, mem.k_proj, mem.v_proj))
    tokens = torch.randn(2, 5, 16)
    out, att = mem(tokens)
    assert out.shape == (2, 5, 16) and att.shape == (2, 5, 9)
    assert torch.allclose(att.sum(-1), torch.ones(2, 5), atol=1e-6)
    k, v = mem.k_proj(mem.memory), mem.v_proj(mem.memory)
    expected = F.scaled_dot_product_attention(mem.q_proj(tokens), k.expand(2, -1, -1),
                                              v.expand(2, -1, -1))
    assert torch.allclose(out, expected, atol=1e-5)


def test_fusions():
    torch.manual_seed(0)
    ch, sp, tok = torch.randn(3, 2, 5, 8).unbind(0)
    assert torch.equal(build_fusion("add", 8)(ch, sp), ch + sp)
    assert torch.equal(build_fusion("multiply", 8)(ch, sp), ch * sp)
    concat = build_fusion("concat", 8)
    assert torch.allclose(concat(ch, sp), concat.proj(torch.cat([ch, sp], -1)))
    gate = GateFusion(8)
    g = torch.sigmoid(gate.proj(torch.cat([ch, sp], -1)))
    assert torch.allclose(gate(ch, sp), g * ch + (1 - g) * sp, atol=1e-6)
    att = AttentionFusion(8)
    w = att.weights(ch, sp, tok)
    assert w.shape == (2, 5, 2) and torch.allclose(w.sum(-1), torch.ones(2, 5), atol=1e-6)
    assert torch.allclose(att(ch, sp, tok), w[..., :1] * ch + w[..., 1:] * sp, atol=1e-6)
    assert not torch.allclose(att.weights(ch, sp, tok), att.weights(ch, sp, -tok))
    with pytest.raises(ValueError, match="concat.*gate"):
        build_fusion("sum", 8)


# ----------------------------------------------------------------------------- UniADMemory

def small_model(**kwargs):
    args = dict(inplanes=[8], instrides=[16], feature_size=[6, 6], hidden_dim=16, nhead=2,
                num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
                channel_memory_size=5, spatial_memory_size=7, ssim_window=7,
                feature_jitter={"scale": 20.0, "prob": 1.0},
                initializer={"method": "xavier_uniform"})
    args.update(kwargs)
    return UniADMemory(**args)


def reconstruction_loss(model, seed=0):
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(seed))
    out = model({"feature_align": x})
    assert out["feature_rec"].shape == x.shape and out["pred"].shape == (2, 1, 96, 96)
    return F.mse_loss(out["feature_rec"], out["feature_align"])


def nonzero_grad(params):
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("memory_mode, fusion_mode",
                         list(itertools.product(MEMORY_MODES, FUSION_MODES)))
def test_modes_build_and_train_exactly_the_memories_they_use(memory_mode, fusion_mode):
    torch.manual_seed(0)
    model = small_model(memory_mode=memory_mode, fusion_mode=fusion_mode, ssim_mode="local")
    reconstruction_loss(model).backward()
    uses_ch, uses_sp = memory_mode in ("channel", "both"), memory_mode in ("spatial", "both")
    names = [n for n, _ in model.named_parameters()]
    if uses_ch:
        assert nonzero_grad(model.channel_memory.parameters())
    else:
        assert model.channel_memory is None and not any("channel_memory" in n for n in names)
    if uses_sp:
        assert nonzero_grad([model.spatial_memory.slots, model.spatial_memory.log_temperature])
    else:
        assert model.spatial_memory is None and not any("spatial_memory" in n for n in names)
    if memory_mode == "both":
        assert nonzero_grad(model.fusion.parameters())
    else:
        assert model.fusion is None
    learned_queries = [layer.learned_embed.weight for layer in model.transformer.decoder_layers]
    if memory_mode == "none":
        assert nonzero_grad(learned_queries)
    else:  # continuous query: the read-out replaces every learned query, which is frozen
        assert all(q.grad is None and not q.requires_grad for q in learned_queries)
    assert nonzero_grad(model.input_proj.parameters())


def test_spatial_memory_gradient_reaches_the_encoder_through_ssim():
    torch.manual_seed(0)
    model = small_model(memory_mode="spatial", ssim_mode="global")
    encoded = torch.randn(2, 36, 16, requires_grad=True)
    query, attention = model.read_memories(encoded)
    assert query.shape == (2, 36, 16) and attention["spatial"].shape == (2, 16, 7)
    attention["spatial"][..., 0].sum().backward()  # depends on the input only through SSIM
    assert encoded.grad.abs().sum() > 0


def test_none_mode_is_uniad():
    torch.manual_seed(0)
    kwargs = dict(inplanes=[8], instrides=[16], feature_size=[6, 6], hidden_dim=16, nhead=2,
                  num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=32)
    uniad = MODELS.get("UniAD")(**kwargs).eval()
    ours = UniADMemory(memory_mode="none", **kwargs).eval()
    ours.load_state_dict(uniad.state_dict())  # strict: the same parameters, nothing more
    x = torch.randn(2, 8, 6, 6)
    a, b = uniad({"feature_align": x}), ours({"feature_align": x})
    assert torch.allclose(a["feature_rec"], b["feature_rec"], atol=1e-6)


def test_continuous_query_changes_the_output():
    torch.manual_seed(0)
    model = small_model(memory_mode="both", fusion_mode="concat").eval()
    x = {"feature_align": torch.randn(2, 8, 6, 6)}
    cont = model(x)["feature_rec"]
    model.continuous_query = False
    first_only = model(x)["feature_rec"]
    assert (cont - first_only).abs().max() > 1e-3
    # built that way, the learned queries of the later layers train, the first layer's not
    ref = small_model(memory_mode="both", continuous_query=False)
    reconstruction_loss(ref).backward()
    first, *later = [layer.learned_embed.weight for layer in ref.transformer.decoder_layers]
    assert first.grad is None and not first.requires_grad and nonzero_grad(later)
    # with one decoder layer "every layer" and "the first layer" coincide
    one = small_model(memory_mode="both", num_decoder_layers=1).eval()
    a = one(x)["feature_rec"]
    one.continuous_query = False
    assert torch.allclose(a, one(x)["feature_rec"])


def test_sigmoid_output_squashes_both_sides():
    torch.manual_seed(0)
    model = small_model(sigmoid_output=True).eval()
    x = torch.randn(2, 8, 6, 6) * 3
    out = model({"feature_align": x})
    assert torch.allclose(out["feature_align"], torch.sigmoid(x))
    assert out["feature_rec"].min() > 0 and out["feature_rec"].max() < 1
    err = (out["feature_rec"] - out["feature_align"]).pow(2).sum(1).sqrt()
    assert torch.allclose(out["pred"][:, 0, 0, 0], err[:, 0, 0], atol=1e-6)
    assert torch.equal(small_model().eval()({"feature_align": x})["feature_align"], x)


@pytest.mark.parametrize("kwargs, valid", [
    ({"memory_mode": "dual"}, "['channel', 'spatial', 'both', 'none']"),
    ({"fusion_mode": "sum"}, "['concat', 'add', 'multiply', 'attention', 'gate']"),
    ({"ssim_mode": "gauss"}, "['global', 'local']"),
    ({"ssim_window": 6}, "positive odd integer"),
])
def test_invalid_modes_name_the_valid_ones(kwargs, valid):
    with pytest.raises(ValueError) as err:
        small_model(**kwargs)
    assert valid in str(err.value)


def test_builds_through_model_helper():
    assert MODELS.get("DuMeNet") is MODELS.get("UniADMemory") is UniADMemory
    assert MODELS.get("models.reconstructions.DuMeNet") is UniADMemory
    net = tiny_net()
    net[2]["type"] = "models.reconstructions.UniADMemory"
    net[2]["kwargs"].update(memory_mode="both", fusion_mode="gate", channel_memory_size=6,
                            spatial_memory_size=6, ssim_mode="local", ssim_window=7)
    model = ModelHelper(net, input_size=[64, 64])
    assert isinstance(model.reconstruction, UniADMemory)
    assert model.reconstruction.spatial_memory.map_size == (4, 4)
    out = model({"image": torch.randn(2, 3, 64, 64)})
    assert out["pred"].shape == (2, 1, 64, 64)
    F.mse_loss(out["feature_rec"], out["feature_align"]).backward()
    assert nonzero_grad([model.reconstruction.spatial_memory.slots,
                         model.reconstruction.channel_memory.memory])
