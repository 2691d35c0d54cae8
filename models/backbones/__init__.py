"""Backbones: importing this package registers them (``timm_backbone`` and UniAD's names)."""
from dualmem.models.backbones.pretrained import PretrainedWeightsUnavailable, create_timm_model  # noqa: F401
from dualmem.models.backbones.timm_backbone import (  # noqa: F401
    UNIAD_BACKBONES,
    TimmBackbone,
    efficientnet_b4,
    efficientnet_lite0,
    efficientnet_lite1,
    efficientnet_lite2,
    resnet18,
    wide_resnet50_2,
)
