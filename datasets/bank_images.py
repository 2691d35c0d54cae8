"""The images a stage-one fit (a memory bank) reads: the training images as they are, each with
``passes`` pseudo anomalies, and the recipe and synthesiser those come from.

The engine (``utils/engine/stage_one.py``) builds loaders over these; the model never touches
the data pipeline.
"""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dualmem.datasets.image_io import model_input
from dualmem.datasets.manifest_dataset import ManifestDataset
from dualmem.datasets.pseudo_anomaly import PseudoAnomalyDataset, apply_pseudo_anomaly
from dualmem.datasets.pseudo_anomaly_synthesis import (STREAM_BANK, PseudoAnomalySynthesizer,
                                               list_textures, load_texture, procedural_texture,
                                               sample_rng, self_image_loader)
from dualmem.utils.errors import UserError

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
    recipe.pop("pool", None)
    source = recipe.pop("texture_source", None) or (
        "folder" if recipe.get("texture_dir") else "procedural")
    return PseudoAnomalySynthesizer(
        source, recipe.pop("texture_dir", None),
        self_images=self_image_loader(dataset) if source == "self" else None, **recipe)


class OutlierImages(Dataset):
    """Outlier texture images for the abnormal bank (DMAD's reference: one DTD image per
    texture class). ``texture_dir``: ``per_folder`` images drawn (``seed``) from every
    sub-folder holding images (all of them when there is one folder only, up to ``count``);
    none: ``count`` procedural textures. Read at the input size and normalised like the
    training images. ``files`` records the provenance."""

    def __init__(self, like, texture_dir=None, count=47, per_folder=1, seed=0):
        self.like = like
        h, w = like.input_size
        self.size = (int(h), int(w))
        rng = np.random.default_rng(int(seed))
        self.seed = int(seed)
        if texture_dir:
            files = list_textures(texture_dir)
            folders = {}
            for f in files:
                folders.setdefault(str(Path(f).parent), []).append(f)
            if len(folders) > 1:
                self.files = [f for d in sorted(folders) for f in
                              rng.choice(folders[d], min(int(per_folder), len(folders[d])),
                                         replace=False).tolist()]
            else:
                self.files = rng.choice(files, min(int(count), len(files)),
                                        replace=False).tolist()
            self.source = f"folder {texture_dir}"
        else:
            if int(count) < 1:
                raise UserError(f"outlier_textures.count must be >= 1, got {count}")
            self.files = [f"procedural:{self.seed}:{i}" for i in range(int(count))]
            self.source = "procedural"

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        h, w = self.size
        f = self.files[i]
        if f.startswith("procedural:"):
            img = procedural_texture(np.random.default_rng([self.seed, i]), h, w)
        else:
            img = load_texture(f, h, w).copy()  # the cache hands out read-only arrays
        image, _ = model_input(img, self.size, getattr(self.like, "resize", "cv2_linear"),
                               self.like.pixel_mean, self.like.pixel_std)
        return {"image": image, "index": i}
