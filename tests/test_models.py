"""Registry, builder, MFCN and the UniAD reconstruction against independent references."""
import pytest
import torch
import torch.nn as nn

from dualmem import models  # noqa: F401  (registers everything)
from conftest import tiny_net
from dualmem.models.model_builder import ModelHelper, NetBuildError
from dualmem.models.reconstructions.transformer import MultiheadAttention, neighbor_mask
from dualmem.models.reconstructions.uniad import add_feature_jitter
from dualmem.models.registry import MODELS, Registry


def test_registry_dotted_and_short_names_and_errors():
    assert MODELS.get("models.necks.MFCN") is MODELS.get("MFCN")
    assert MODELS.get("models.reconstructions.UniAD") is MODELS.get("UniAD")
    with pytest.raises(KeyError) as err:
        MODELS.get("models.necks.MFNC")
    msg = str(err.value)
    assert "Did you mean" in msg and "MFCN" in msg and "Registered:" in msg and "UniAD" in msg
    reg = Registry("x")
    reg.register(name="a")(int)
    with pytest.raises(KeyError, match="already registered"):
        reg.register(name="a")(float)


def test_registry_imports_unregistered_dotted_paths_only_when_trusted():
    """A config may not import code on its own say; ``--plugins torch`` (or
    ``--trust_checkpoint``) lets the user allow it."""
    from dualmem.models.registry import UntrustedTypeError, everything_trusted, reset_trust, trust_plugins

    with pytest.raises(UntrustedTypeError, match="--plugins torch"):
        MODELS.get("torch.nn.Identity")
    with everything_trusted():
        assert MODELS.get("torch.nn.Identity") is nn.Identity
    try:
        trust_plugins(["torch.nn"])
        assert MODELS.get("torch.nn.Identity") is nn.Identity
    finally:
        reset_trust()


def brute_force_mask(h, w, hm, wm):
    """UniAD's loop construction: 0 inside the neighbourhood (not allowed)."""
    mask = torch.ones(h, w, h, w)
    for i in range(h):
        for j in range(w):
            mask[i, j, max(i - hm // 2, 0):min(i + hm // 2 + 1, h),
                 max(j - wm // 2, 0):min(j + wm // 2 + 1, w)] = 0
    return mask.view(h * w, h * w).bool()


@pytest.mark.parametrize("size, nb", [((14, 14), (7, 7)), ((8, 6), (3, 5)), ((5, 9), (1, 3))])
def test_neighbor_mask_matches_brute_force(size, nb):
    assert torch.equal(neighbor_mask(size, nb), brute_force_mask(*size, *nb))


def test_neighbor_mask_covering_everything_is_an_error():
    with pytest.raises(ValueError, match="covers the whole"):
        neighbor_mask((3, 3), (7, 7))


def test_feature_jitter_statistics():
    torch.manual_seed(0)
    tokens = torch.randn(4, 50, 64) * 3
    jittered = add_feature_jitter(tokens, scale=20.0, prob=1.0)
    noise = jittered - tokens
    expected_std = tokens.norm(dim=-1, keepdim=True) / 64 * 20.0
    z = noise / expected_std
    assert abs(z.mean().item()) < 0.02
    assert abs(z.std().item() - 1.0) < 0.02
    assert torch.equal(add_feature_jitter(tokens, 20.0, prob=0.0), tokens)


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 4).eval()
    ref = nn.MultiheadAttention(32, 4).eval()
    ref.load_state_dict(ours.state_dict())  # same parameter names: UniAD checkpoints load
    q, k, v = torch.randn(3, 2, 10, 32).unbind(0)
    allowed = torch.rand(10, 10) > 0.3
    allowed[:, 0] = True
    out = ours(q, k, v, allowed)
    expected = ref(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                   attn_mask=~allowed)[0].transpose(0, 1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_mfcn_shapes_and_alignment():
    neck = MODELS.get("MFCN")(inplanes=[4, 8, 16], instrides=[4, 8, 16], outstrides=[8])
    feats = [torch.randn(2, 4, 32, 32), torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)]
    out = neck({"features": feats})
    assert out["feature_align"].shape == (2, 28, 16, 16)
    assert torch.equal(out["feature_align"][:, 4:12], feats[1])  # already at stride 8
    assert neck.get_outplanes() == [28] and neck.get_outstrides() == [8]
    with pytest.raises(ValueError, match="outplanes"):
        MODELS.get("MFCN")(inplanes=[4], instrides=[4], outstrides=[4], outplanes=[5])


def test_builder_wires_prev_and_freezes():
    model = ModelHelper(tiny_net(), input_size=[64, 64])
    assert model.neck.inplanes == model.backbone.get_outplanes()
    assert model.reconstruction.feature_size == [4, 4]
    assert all(not p.requires_grad for p in model.backbone.parameters())
    trainable = set(map(id, model.trainable_parameters()))
    assert trainable == {id(p) for p in model.reconstruction.parameters()}
    model.train()
    assert not model.backbone.training and model.reconstruction.training
    out = model({"image": torch.randn(2, 3, 64, 64)})
    assert out["pred"].shape == (2, 1, 64, 64)
    assert out["feature_rec"].shape == out["feature_align"].shape
    loss = (out["feature_rec"] - out["feature_align"]).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.reconstruction.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_anomaly_map_is_upsampled_reconstruction_error():
    model = ModelHelper(tiny_net(), input_size=[64, 64]).eval()
    out = model({"image": torch.randn(1, 3, 64, 64)})
    err = (out["feature_rec"] - out["feature_align"]).pow(2).sum(1, keepdim=True).sqrt()
    # align_corners=True keeps the corner values exactly
    assert torch.allclose(out["pred"][0, 0, 0, 0], err[0, 0, 0, 0], atol=1e-5)
    assert torch.allclose(out["pred"][0, 0, -1, -1], err[0, 0, -1, -1], atol=1e-5)


@pytest.mark.parametrize("patch, message", [
    ({"type": "models.necks.Nope"}, "unknown model type 'models.necks.Nope'"),
    ({"kwargs": {"outstrides": [16], "outstride": 3}}, "unknown kwarg 'outstride'; did you mean"),
])
def test_builder_errors_name_the_module(patch, message):
    net = tiny_net()
    net[1].update(patch)
    with pytest.raises(NetBuildError, match=message):
        ModelHelper(net, input_size=[64, 64])


def test_input_size_not_divisible_by_stride():
    with pytest.raises(NetBuildError, match="not divisible by the stride 16"):
        ModelHelper(tiny_net(), input_size=[72, 64])


def test_positions_sine_and_learned_shapes():
    from dualmem.models.reconstructions.transformer import build_position_embedding

    for kind in ("sine", "learned"):
        pos = build_position_embedding(kind, (3, 5), 16)()
        assert pos.shape == (15, 16)
        assert len({tuple(r.tolist()) for r in pos}) == 15  # every position distinct
    with pytest.raises(ValueError, match="pos_embed_type"):
        build_position_embedding("rope", (3, 5), 16)


def test_reference_attention_path_gives_the_same_maps():
    model = ModelHelper(tiny_net(), input_size=[64, 64]).eval()
    x = {"image": torch.randn(2, 3, 64, 64)}
    fast = model(x)["pred"]
    model.reconstruction.transformer.set_attn_impl("reference")
    ref = model(x)["pred"]
    assert torch.allclose(fast, ref, atol=1e-4)
    with pytest.raises(ValueError, match="attn_impl"):
        model.reconstruction.transformer.set_attn_impl("flash")
