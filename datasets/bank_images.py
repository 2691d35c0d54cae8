"""The images a stage-one fit (a memory bank) reads: the training images as they are, each with
``passes`` pseudo anomalies, and the recipe and synthesiser those come from.

The engine (``utils/engine/stage_one.py``) builds loaders over these; the model never touches
the data pipeline.
"""
import torch
from torch.utils.data import Dataset

from datasets.manifest_dataset import ManifestDataset
from datasets.pseudo_anomaly import (STREAM_BANK, PseudoAnomalyDataset,
                                     PseudoAnomalySynthesizer, apply_pseudo_anomaly, sample_rng,
                                     self_image_loader)

RECIPE_KEYS = ("texture_source", "texture_dir", "beta", "perlin_scale", "threshold", "rotate",
               "coverage", "texture_augmentations")


class BankImages(Dataset):
    """Plain training images for bank building, with ``passes`` pseudo anomalies each."""

    def __init__(self, dataset, indices, class_ids, synth=None, passes=0, seed=0):
        self.dataset, self.indices, self.class_ids = dataset, list(indices), class_ids
        self.synth, self.passes, self.seed = synth, int(passes), int(seed)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        item = self.dataset[i]
        out = {"image": item["image"], "mask": item["mask"], "index": i,
               "cls": self.class_ids[item["clsname"]]}
        if self.passes:
            pseudo = [apply_pseudo_anomaly(item, self.synth, sample_rng(self.seed, p, i,
                                                                        STREAM_BANK),
                                           self.dataset.pixel_mean, self.dataset.pixel_std, i)
                      for p in range(self.passes)]
            out["pseudo_image"] = torch.stack([p["image"] for p in pseudo])
            out["pseudo_mask"] = torch.stack([p["mask"] for p in pseudo])
        return out


def plain_images(train_set):
    """The training images as they are: no augmentation, no pseudo anomalies; index = the
    training set's index."""
    base = train_set.base if isinstance(train_set, PseudoAnomalyDataset) else train_set
    return ManifestDataset(base.records, base.image_dir, base.input_size, base.pixel_mean,
                           base.pixel_std, getattr(base, "color_mode", "RGB"),
                           resize=getattr(base, "resize", "cv2_linear"))


def training_recipe(train_set):
    """The pseudo-anomaly recipe of ``dataset.train.pseudo_anomaly``, or {} (procedural)."""
    synth = getattr(train_set, "synth", None)
    if synth is None:
        return {}
    return {k: getattr(synth, k) for k in RECIPE_KEYS}


def bank_synthesizer(recipe, dataset):
    """A pseudo-anomaly synthesiser for ``recipe`` (``prob`` and ``seed`` are the training
    stream's and do not apply here)."""
    recipe = dict(recipe or {})
    recipe.pop("prob", None)
    recipe.pop("seed", None)
    source = recipe.pop("texture_source", None) or (
        "folder" if recipe.get("texture_dir") else "procedural")
    return PseudoAnomalySynthesizer(
        source, recipe.pop("texture_dir", None),
        self_images=self_image_loader(dataset) if source == "self" else None, **recipe)
