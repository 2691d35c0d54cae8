"""UniAD's Multi-scale Feature Concatenation Network: resize every stage to one stride, concat."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualmem.models.registry import MODELS
from dualmem.utils.errors import UserError


@MODELS.register(path="models.necks")
class MFCN(nn.Module):
    def __init__(self, inplanes, instrides, outstrides=(16,), outplanes=None):
        super().__init__()
        inplanes, instrides, outstrides = list(inplanes), list(instrides), list(outstrides)
        if len(inplanes) != len(instrides):
            raise UserError(f"MFCN: inplanes {inplanes} and instrides {instrides} differ in length")
        if len(outstrides) != 1:
            raise UserError(f"MFCN: exactly one outstride is supported, got {outstrides}")
        if outplanes is not None and list(outplanes) != [sum(inplanes)]:
            raise UserError(f"MFCN: outplanes must be [sum(inplanes)] = [{sum(inplanes)}] "
                             f"(features are concatenated), got {outplanes}")
        self.inplanes = inplanes
        self.instrides = instrides
        self.outstrides = outstrides
        self.outplanes = [sum(inplanes)]

    def forward(self, input):
        features = input["features"]
        out_stride = self.outstrides[0]
        # target size from the stage that already sits at (or closest to) the output stride
        ref = min(range(len(features)), key=lambda i: abs(self.instrides[i] - out_stride))
        h, w = (int(s) for s in features[ref].shape[-2:])  # ints also while tracing (export)
        th = round(h * self.instrides[ref] / out_stride)
        tw = round(w * self.instrides[ref] / out_stride)
        resized = [f if f.shape[-2:] == (th, tw) else
                   F.interpolate(f, size=(th, tw), mode="bilinear", align_corners=True)
                   for f in features]
        return {"feature_align": torch.cat(resized, dim=1), "outplane": self.outplanes}

    def get_outplanes(self):
        return self.outplanes

    def get_outstrides(self):
        return self.outstrides
