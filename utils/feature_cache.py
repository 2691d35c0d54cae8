"""Frozen-prefix feature cache: with a frozen backbone and deterministic inputs, the backbone
(and neck) outputs are the same every epoch, so compute them once and train the head from them.

On CPU the backbone is most of a UniAD step; caching turns an epoch into head-only work.
"""
import torch
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm import tqdm

META_KEYS = ("mask", "label", "clsname", "filename", "index")


class CachedFeatureDataset(Dataset):
    """Per-sample cached outputs of the frozen prefix plus the sample's labels and mask."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() and k != "mask"
                    else v) for k, v in item.items()}


class SkipPrefix(nn.Module):
    """Runs a ModelHelper from the first module after the cached prefix."""

    def __init__(self, model, start):
        super().__init__()
        self.model = model
        self.start = start

    def forward(self, inputs):
        return self.model(inputs, start=self.start)


@torch.no_grad()
def build_feature_cache(model, loader, device, dtype=torch.float32, progress=True,
                        desc="caching features"):
    """Outputs of the last frozen-prefix module for every sample, indexed as the dataset."""
    names = model.frozen_prefix
    last = getattr(model, names[-1])
    was_training = model.training
    model.eval()
    items = [None] * len(loader.dataset)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        data = {"image": batch["image"].to(device)}
        for name in names[:-1]:
            data.update(getattr(model, name)(data))
        out = last(data)
        for i, index in enumerate(batch["index"].tolist()):
            item = {k: v[i].to("cpu", dtype) for k, v in out.items()
                    if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == len(batch["index"])}
            for key in META_KEYS:
                value = batch[key][i]
                item[key] = value.item() if key in ("label", "index") else value
            items[index] = item
    model.train(was_training)
    return CachedFeatureDataset(items)
