"""PatchCore-style locally aware patch features: the input of memory-bank methods (DMAD).

Each chosen backbone stage is averaged over its 3x3 neighbourhood (stride 1, padding 1), so a
patch feature describes a small region rather than one position; the stages are upsampled
(bilinear) to the finest stage's size and concatenated. An optional projection fixes
the dimension without learned parameters, so backbone + neck stay a frozen, cacheable prefix:

* ``projection: avgpool`` - adaptive average pooling over channels to ``out_dim`` (PatchCore's
  final aggregation);
* ``projection: random`` - a fixed Gaussian random projection (seeded, scaled by
  1/sqrt(out_dim)), which preserves distances in expectation (Johnson-Lindenstrauss);
* ``projection: none`` - the concatenation as is.

Our choice: padded border positions are left out of the 3x3 average
(``count_include_pad: false``), so border patches are not pulled towards zero.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualmem.models.registry import MODELS
from dualmem.utils.errors import UserError

PROJECTIONS = ("none", "avgpool", "random")


@MODELS.register(path="models.necks")
class PatchCoreNeck(nn.Module):
    def __init__(self, inplanes, instrides, out_dim=None, projection=None, patch_size=3,
                 count_include_pad=False, seed=0):
        super().__init__()
        inplanes, instrides = [int(c) for c in inplanes], [int(s) for s in instrides]
        if len(inplanes) != len(instrides) or not inplanes:
            raise UserError(f"PatchCoreNeck: inplanes {inplanes} and instrides {instrides} must "
                             f"be non-empty and of equal length")
        if projection is None:
            projection = "avgpool" if out_dim else "none"
        if projection not in PROJECTIONS:
            raise UserError(f"PatchCoreNeck: projection must be one of {PROJECTIONS}, got "
                             f"'{projection}'")
        total = sum(inplanes)
        if projection != "none":
            if not out_dim or int(out_dim) < 1:
                raise UserError(f"PatchCoreNeck: projection '{projection}' needs out_dim >= 1")
            if projection == "avgpool" and int(out_dim) > total:
                raise UserError(f"PatchCoreNeck: out_dim {out_dim} exceeds the {total} "
                                 f"concatenated channels; avgpool can only reduce")
        elif out_dim not in (None, total):
            raise UserError(f"PatchCoreNeck: out_dim {out_dim} needs a projection "
                             f"(avgpool | random); without one the output has {total} channels")
        if int(patch_size) < 1 or int(patch_size) % 2 == 0:
            raise UserError(f"PatchCoreNeck: patch_size must be odd and >= 1, got {patch_size}")
        self.inplanes, self.instrides = inplanes, instrides
        self.patch_size = int(patch_size)
        self.count_include_pad = bool(count_include_pad)
        self.projection = projection
        self.out_dim = total if projection == "none" else int(out_dim)
        if projection == "random":
            g = torch.Generator().manual_seed(int(seed))
            weight = torch.randn(total, self.out_dim, generator=g) / self.out_dim ** 0.5
            self.register_buffer("random_matrix", weight)

    def forward(self, input):
        features = input["features"]
        if len(features) != len(self.inplanes):
            raise UserError(f"PatchCoreNeck: expected {len(self.inplanes)} feature maps, got "
                             f"{len(features)}")
        size = features[self.instrides.index(min(self.instrides))].shape[-2:]
        p = self.patch_size
        out = []
        for f in features:
            if p > 1:
                f = F.avg_pool2d(f, p, stride=1, padding=p // 2,
                                 count_include_pad=self.count_include_pad)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            out.append(f)
        x = torch.cat(out, dim=1)
        if self.projection == "avgpool" and self.out_dim != x.shape[1]:
            b, c, h, w = x.shape
            x = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, c), self.out_dim)
            x = x.reshape(b, h, w, self.out_dim).permute(0, 3, 1, 2)
        elif self.projection == "random":
            x = torch.einsum("bchw,cd->bdhw", x, self.random_matrix.to(x.dtype))
        return {"feature_align": x.contiguous(), "outplane": [self.out_dim]}

    def get_outplanes(self):
        return [self.out_dim]

    def get_outstrides(self):
        return [min(self.instrides)]
