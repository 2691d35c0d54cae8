"""Pseudo anomalies in a training set: Dataset wrappers around the DRAEM recipe.

The recipe itself (Perlin masks, textures, blending, seeding) is
``datasets/pseudo_anomaly_synthesis.py``; this module decides which sample shows which pseudo
anomaly. Everything random comes from :func:`sample_rng` of (seed, epoch, index, stream), so a
sample is the same in every run, worker layout or resume.

``pool: P`` (ours, for speed): each image has P fixed pseudo-anomaly variants, and an epoch shows
each image as itself (probability ``1 - prob``) or as one of its P variants. DRAEM makes a new
one every epoch (``pool: null``); with a pool the inputs come from a finite set of
``(P + 1) x images`` fixed images, so the engine computes the frozen backbone's features once
(:meth:`PseudoAnomalyDataset.pool_dataset`) and DMAD keeps each image's retrieval.
"""
import torch
from torch.utils.data import Dataset

from dualmem.datasets.pseudo_anomaly_synthesis import (STREAM_POOL, STREAM_TRAIN, STREAM_VARIANT,
                                               PseudoAnomalySynthesizer, sample_rng,
                                               self_image_loader)
from dualmem.utils.errors import UserError


class PseudoAnomalyDataset(Dataset):
    """Wraps a ManifestDataset: each normal sample becomes a pseudo anomaly with probability
    ``prob`` (image, mask and label changed; everything else as the base returns it).

    ``deterministic = False`` tells the Trainer that its inputs change every epoch (no plain
    feature cache; with a ``pool`` it caches :meth:`pool_dataset` instead). The epoch comes from
    ``epoch_source.epoch`` when linked (the Trainer links its sampler) or from :meth:`set_epoch`.
    """

    deterministic = False

    def __init__(self, base, prob=0.5, seed=0, texture_source=None, texture_dir=None,
                 pool=None, **recipe):
        if not 0.0 <= float(prob) <= 1.0:
            raise UserError(f"dataset.train.pseudo_anomaly.prob must be in [0, 1], got {prob}")
        if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int)
                                 or pool < 1):
            raise UserError(f"dataset.train.pseudo_anomaly.pool must be null (a new pseudo "
                            f"anomaly every epoch) or an integer >= 1, got {pool!r}")
        self.base = base
        self.prob = float(prob)
        self.seed = int(seed)
        self.pool = pool
        self.recipe = dict(recipe, texture_source=texture_source, texture_dir=texture_dir)
        self.epoch = 0
        self.epoch_source = None
        source = texture_source or ("folder" if texture_dir else "procedural")
        self.synth = PseudoAnomalySynthesizer(
            source, texture_dir,
            self_images=self_image_loader(base) if source == "self" else None, **recipe)

    def __getattr__(self, name):
        # records, image_dir, input_size, source, augment, ... live on the base dataset
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def records(self):
        return self.base.records

    @records.setter
    def records(self, value):
        self.base.records = value

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def current_epoch(self):
        return int(self.epoch_source.epoch) if self.epoch_source is not None else self.epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        if self.pool is not None:
            return self.variant(index, self.variant_of(self.current_epoch(), index))
        item = self.base[index]
        if int(item["label"]) != 0 or self.prob <= 0.0:
            return item
        rng = sample_rng(self.seed, self.current_epoch(), index, STREAM_TRAIN)
        if rng.random() >= self.prob:
            return item
        return apply_pseudo_anomaly(item, self.synth, rng, self.base.pixel_mean,
                                    self.base.pixel_std, index)

    # ------------------------------------------------------------------ pool
    def variant_of(self, epoch, index):
        """With a pool: which of image ``index``'s versions epoch ``epoch`` shows (0: the image
        itself, v >= 1: its pseudo-anomaly variant v)."""
        rng = sample_rng(self.seed, epoch, index, STREAM_POOL)
        if rng.random() >= self.prob:
            return 0
        return 1 + int(rng.integers(self.pool))

    def variant(self, index, v):
        """Version ``v`` of image ``index``; the same every time it is asked for. Labelled
        anomalies (seen anomalies) are never changed."""
        item = self.base[index]
        if v == 0 or int(item["label"]) != 0:
            return item
        rng = sample_rng(self.seed, v - 1, index, STREAM_VARIANT)
        return apply_pseudo_anomaly(item, self.synth, rng, self.base.pixel_mean,
                                    self.base.pixel_std, index)

    def pool_dataset(self):
        """Every version of every image (``(pool + 1) x len``; None without a pool): fixed
        inputs, so the engine may cache what frozen modules make of them."""
        return PseudoAnomalyPool(self) if self.pool is not None else None

    def pool_position(self, epoch, index):
        """The :meth:`pool_dataset` index of what epoch ``epoch`` shows for image ``index``."""
        return index * (self.pool + 1) + self.variant_of(epoch, index)


class PseudoAnomalyPool(Dataset):
    """All ``pool + 1`` versions of every image of a pooled :class:`PseudoAnomalyDataset`, at
    ``index * (pool + 1) + v``. Items keep the image's ``index`` (leave-one-image-out needs it)
    and carry ``cache_index``, their position here."""

    deterministic = True

    def __init__(self, source):
        self.source = source
        self.versions = source.pool + 1

    def __getattr__(self, name):
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __len__(self):
        return len(self.source) * self.versions

    def __getitem__(self, position):
        index, v = divmod(int(position), self.versions)
        item = dict(self.source.variant(index, v))
        item["cache_index"] = int(position)
        return item

    def cache_identity(self):
        """What, besides the records, fixes these inputs (part of the on-disk cache key)."""
        return {"pseudo_anomaly": {"prob": self.source.prob, "seed": self.source.seed,
                                   "pool": self.source.pool, **self.source.recipe}}


def apply_pseudo_anomaly(item, synth, rng, pixel_mean, pixel_std, index=None):
    """A ManifestDataset item with a pseudo anomaly blended in (new dict; same keys)."""
    mean = torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1)
    image01 = (item["image"] * std + mean).clamp_(0, 1).permute(1, 2, 0).numpy()
    out, mask = synth(rng, image01, index)
    image = (torch.from_numpy(out).permute(2, 0, 1) - mean) / std
    mask_t = torch.maximum(item["mask"], torch.from_numpy(mask).unsqueeze(0))
    new = dict(item)
    new.update(image=image.contiguous(), mask=mask_t,
               label=int(mask_t.max().item() > 0.5))
    return new


def wrap_pseudo_anomalies(train_set, cfg, default_seed=0):
    """``dataset.train.pseudo_anomaly`` -> the wrapped training set (unchanged when absent or
    ``prob`` is 0)."""
    if not cfg:
        return train_set
    cfg = dict(cfg)
    allowed = {"prob", "seed", "texture_source", "texture_dir", "beta", "perlin_scale",
               "threshold", "rotate", "coverage", "texture_augmentations", "pool"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise UserError(f"dataset.train.pseudo_anomaly: unknown key(s) {unknown} "
                         f"(valid: {sorted(allowed)})")
    prob = float(cfg.pop("prob", 0.5))
    if prob <= 0.0:
        return train_set
    seed = int(cfg.pop("seed", default_seed))
    return PseudoAnomalyDataset(train_set, prob=prob, seed=seed, **cfg)
