"""Stage one: heads fitted on the training data before training (memory banks).

A net module takes part by declaring ``fit_spec()`` and implementing ``fit(data)``. The engine
reads the spec, builds the loaders (``datasets/bank_images.py``: the plain training images, with
pseudo anomalies when asked), runs the frozen modules before the head on each batch through
``ModelHelper.prefix_outputs`` (the one place that runs a prefix of the net) and hands the head
feature batches, with its device, progress bar and logger. The head never sees the engine or the
data pipeline.

``fit_spec()`` keys: ``output`` (the key of the prefix's output to feed, e.g. feature_align),
``pseudo_per_image`` (pseudo anomalies per normal image, 0 for none), ``pseudo_recipe`` (a
``dataset.train.pseudo_anomaly``-style dict, or None for the training set's own recipe),
``batch_size`` (None: the training batch size), ``seed`` and ``outlier_images`` (None, or the
:class:`datasets.bank_images.OutlierImages` kwargs: outlier texture images fed as
``outlier_batches``).
"""
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dualmem.datasets.bank_images import (BankImages, OutlierImages, bank_synthesizer, plain_images,
                                  training_recipe)
from dualmem.utils.errors import UserError


@dataclass
class StageOneData:
    """What ``fit(data)`` receives. ``normal_batches`` yield ``features`` (B, C, h, w),
    ``index`` and ``cls`` (B,) and, with pseudo anomalies, ``pseudo_features``
    (B * pseudo_per_image, C, h, w) and ``pseudo_mask``; ``seen_batches`` yield ``features``,
    ``mask``, ``index``, ``cls`` of the labelled anomalies. Everything is on ``device``."""
    class_names: List[str]
    normal_batches: Iterable
    n_normal_batches: int
    n_normal: int
    seen_batches: Iterable
    n_seen: int
    pseudo: bool
    device: torch.device
    log: Optional[Callable] = None
    outlier_batches: Iterable = ()
    n_outlier: int = 0
    outlier_source: Optional[str] = None
    outlier_files: Optional[List[str]] = None


def stage_one_modules(model):
    """(index, name, module) of every net module that asks for stage one."""
    return [(i, n, getattr(model, n)) for i, n in enumerate(model.module_names)
            if callable(getattr(getattr(model, n), "fit_spec", None))]


def run_stage_one(model, train_set, device, batch_size=8, workers=0, progress=True, log=None,
                  plain=None):
    """Fit every module that declares ``fit_spec``; returns {name: what its fit returned}.
    ``plain``: the images to read (default: the training set's plain images)."""
    out = {}
    for i, name, module in stage_one_modules(model):
        trainable = [n for n in model.module_names[:i] if n not in model.frozen_prefix]
        if trainable:
            raise UserError(f"net module '{name}' is fitted on the outputs of the modules "
                             f"before it, which must be frozen or parameter-free (the fit "
                             f"would go stale otherwise); trainable: {trainable}")
        if log:
            log(f"preparing '{name}' ({type(module).__name__})")
        spec = dict(module.fit_spec())
        data = stage_one_data(prefix_extractor(model, i, spec.get("output", "feature_align")),
                              spec, train_set, device, int(spec.get("batch_size") or batch_size),
                              workers, progress, log, plain)
        out[name] = module.fit(data)
    return out


def prefix_extractor(model, index, key):
    """``images -> model.prefix_outputs(images, index)[key]``, with a clear error when the
    modules before net module ``index`` do not give ``key``."""
    def extract(images):
        out = model.prefix_outputs(images, index)
        if key not in out:
            raise UserError(f"net module '{model.module_names[index]}' is fitted on '{key}', "
                            f"which the modules before it do not give (use a neck such as "
                            f"models.necks.PatchCoreNeck)")
        return out[key]

    return extract


def stage_one_data(extract, spec, train_set, device, batch_size=8, workers=0, progress=False,
                   log=None, plain=None):
    """The :class:`StageOneData` for one head: ``extract(images on device) -> features``."""
    plain = plain if plain is not None else plain_images(train_set)
    records = plain.records
    class_names = sorted({r["clsname"] for r in records})
    class_ids = {c: i for i, c in enumerate(class_names)}
    normal_idx = [i for i, r in enumerate(records) if int(r["label"]) == 0]
    seen_idx = [i for i, r in enumerate(records) if int(r["label"]) == 1]
    passes = int(spec.get("pseudo_per_image") or 0)
    seed = int(spec.get("seed") or 0)
    synth = None
    if passes:
        recipe = spec.get("pseudo_recipe")
        synth = bank_synthesizer(recipe if recipe is not None else training_recipe(train_set),
                                 plain)

    normal_loader = DataLoader(BankImages(plain, normal_idx, class_ids, synth, passes, seed),
                               batch_size=batch_size, num_workers=workers, shuffle=False)

    def normal_batches():
        for batch in tqdm(normal_loader, desc="stage one (normal images)",
                          disable=not progress, leave=False, dynamic_ncols=True):
            item = {"features": extract(batch["image"].to(device)),
                    "index": batch["index"].to(device),
                    "cls": batch["cls"].to(device)}
            if passes:
                item["pseudo_features"] = extract(batch["pseudo_image"].flatten(0, 1).to(device))
                item["pseudo_mask"] = batch["pseudo_mask"].flatten(0, 1).to(device)
            yield item

    def seen_batches():
        loader = DataLoader(BankImages(plain, seen_idx, class_ids), batch_size=batch_size,
                            num_workers=workers, shuffle=False)
        for batch in tqdm(loader, desc="stage one (seen anomalies)", disable=not progress,
                          leave=False, dynamic_ncols=True):
            yield {"features": extract(batch["image"].to(device)),
                   "mask": batch["mask"].to(device),
                   "index": batch["index"].to(device), "cls": batch["cls"].to(device)}

    outliers = OutlierImages(plain, **spec["outlier_images"]) \
        if spec.get("outlier_images") else None

    def outlier_batches():
        loader = DataLoader(outliers, batch_size=batch_size, num_workers=workers, shuffle=False)
        for batch in tqdm(loader, desc="stage one (outlier textures)", disable=not progress,
                          leave=False, dynamic_ncols=True):
            yield {"features": extract(batch["image"].to(device))}

    return StageOneData(class_names, normal_batches(), len(normal_loader), len(normal_idx),
                        seen_batches(), len(seen_idx), bool(passes), device, log,
                        outlier_batches() if outliers else (), len(outliers or []),
                        outliers.source if outliers else None,
                        list(outliers.files) if outliers else None)
