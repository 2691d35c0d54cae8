"""Frozen-prefix feature cache: with a frozen backbone and deterministic inputs, the backbone
(and neck) outputs are the same every epoch, so compute them once and train the head from them.

On CPU the backbone is most of a UniAD step; caching turns an epoch into head-only work.
With ``trainer.feature_cache_dir`` the cache also goes to disk, keyed by everything that
determines it (the prefix's config and weights, the records, every file's size and mtime, input
size, normalisation, dtype), so later runs of the same data and backbone skip the
backbone entirely; any change gives a new key, never a stale hit.

Pseudo anomalies made on the fly change the inputs every epoch and rule the cache out, unless
they come from a fixed pool (``dataset.train.pseudo_anomaly.pool``): then every version of every
image is cached once and each epoch reads the versions it shows (:class:`PoolSelection`).
Cached items carry ``cache_index`` (their position in the cache), which tells a head that the
same position always holds the same features (DMAD keeps its retrieval per position).
"""
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm import tqdm

from dualmem.datasets.builder import build_loader
from dualmem.utils import distributed as du
from dualmem.utils.errors import UserError

META_KEYS = ("mask", "label", "clsname", "filename", "index")


class CachedFeatureDataset(Dataset):
    """Per-sample cached outputs of the frozen prefix plus the sample's labels and mask."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        out = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() and k != "mask"
                   else v) for k, v in item.items()}
        out["cache_index"] = int(index)
        return out


class PoolSelection(Dataset):
    """The training set seen through a cached pseudo-anomaly pool: item ``i`` of an epoch is
    the cached version of image ``i`` that the pooled dataset shows in that epoch."""

    def __init__(self, cached, source):
        self.cached, self.source = cached, source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return self.cached[self.source.pool_position(self.source.current_epoch(), index)]


class SkipPrefix(nn.Module):
    """Runs a ModelHelper from the first module after the cached prefix."""

    def __init__(self, model, start):
        super().__init__()
        self.model = model
        self.start = start

    def forward(self, inputs):
        return self.model(inputs, start=self.start)


def _file_stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None  # a missing file fails in the data pipeline with its own clear error
    return [st.st_size, st.st_mtime_ns]


def cache_key(model, dataset, net_cfg, dtype, split):
    """Hex digest of what determines the cached outputs of ``model.frozen_prefix``."""
    h = hashlib.sha256()
    prefix = list(model.frozen_prefix)

    def put(obj):
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())

    put({"split": split, "dtype": str(dtype), "prefix": prefix,
         "net": [dict(e) for e in net_cfg if e.get("name") in prefix],
         "input_size": list(getattr(dataset, "input_size", []) or []),
         "mean": list(dataset.pixel_mean), "std": list(dataset.pixel_std),
         "color": getattr(dataset, "color_mode", "RGB"),
         "resize": getattr(dataset, "resize", None),
         "identity": getattr(dataset, "cache_identity", lambda: None)()})
    for name in prefix:  # the weights themselves: a re-downloaded or edited backbone differs
        for key, value in getattr(model, name).state_dict().items():
            if torch.is_tensor(value):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                         .numpy().tobytes())
    path_of = getattr(dataset, "path_of", None)
    for rec in dataset.records:
        stamps = [_file_stamp(path_of(rec[k])) for k in ("filename", "maskname")
                  if rec.get(k) and path_of is not None]
        put([dict(rec), stamps])
    return h.hexdigest()


def save_cache(cached, path, key):
    """Stacked per-key tensors (masks as uint8 when binary), written atomically."""
    from dualmem.utils.checkpoint import save_checkpoint

    items = cached.items
    packed = {}
    for k in items[0]:
        values = [it[k] for it in items]
        if torch.is_tensor(values[0]):
            t = torch.stack(values)
            if k == "mask" and bool(((t == 0) | (t == 1)).all()):
                t = t.to(torch.uint8)
            packed[k] = t
        else:
            packed[k] = values
    save_checkpoint({"key": key, "n": len(items), "data": packed}, path)


def load_cache(path, key):
    """The CachedFeatureDataset saved at ``path``; None when absent or for another key."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"feature cache {path} is unreadable ({type(exc).__name__}: "
                           f"{exc}); delete it to rebuild") from None
    if state.get("key") != key:
        return None
    n, data = state["n"], state["data"]
    items = []
    for i in range(n):
        item = {}
        for k, v in data.items():
            x = v[i]
            if k == "mask" and torch.is_tensor(x) and x.dtype == torch.uint8:
                x = x.float()
            item[k] = x
        items.append(item)
    return CachedFeatureDataset(items)


@torch.no_grad()
def build_feature_cache(model, loader, device, dtype=torch.float32, progress=True,
                        desc="caching features"):
    """Outputs of the last frozen-prefix module for every sample, indexed as the dataset
    (at ``cache_index`` where items carry one, else at ``index``)."""
    stop = len(model.frozen_prefix)
    items = [None] * len(loader.dataset)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        out = model.prefix_outputs(batch["image"].to(device), stop)
        where = batch.get("cache_index", batch["index"])
        for i, index in enumerate(where.tolist()):
            item = {k: v[i].to("cpu", dtype) for k, v in out.items()
                    if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == len(batch["index"])}
            for key in META_KEYS:
                value = batch[key][i]
                item[key] = value.item() if key in ("label", "index") else value
            items[index] = item
    return CachedFeatureDataset(items)


class FeatureCacheMixin:
    """The Trainer's cache side: decide, build (or read) once, swap the loaders and the net."""

    def _cache_wanted(self, setting):
        """``trainer.feature_cache``: auto (when valid), true (error when invalid), false."""
        if not setting:
            return False
        prefix = self.model.frozen_prefix
        reasons = []
        if not prefix:
            reasons.append("no frozen leading modules before a trainable one")
        elif len(prefix) == len(self.model.module_names):
            reasons.append("nothing in the net trains (every module is frozen or fitted in "
                           "stage one), so each image runs once")
        if getattr(self.train_set, "augment", None) is not None:
            reasons.append("training augmentations are on (inputs change every epoch)")
        if not getattr(self.train_set, "deterministic", True) and self._train_pool() is None:
            reasons.append("the training data is generated on the fly (a fixed pool, "
                           "dataset.train.pseudo_anomaly.pool, allows the cache)")
        if reasons:
            if setting is True:
                raise UserError(f"trainer.feature_cache: true, but {'; '.join(reasons)}")
            self.logger.info(f"feature cache off: {'; '.join(reasons)}")
            return False
        return True

    def _train_pool(self):
        """The pooled pseudo-anomaly dataset to cache (every version of every image), or None."""
        pool = getattr(self.train_set, "pool_dataset", None)
        return pool() if callable(pool) else None

    def _cache_dtype(self):
        return torch.float16 if self.cfg.trainer.get("feature_cache_dtype") == "float16" \
            else torch.float32

    def _ensure_cache(self, train):
        """Swap a loader for one over cached prefix outputs, on first use."""
        if not self.use_cache or (self._train_cached if train else self._test_cached):
            return
        t0 = time.time()
        if train:
            # own generator: building the cache must not consume the global RNG, or the
            # feature jitter after it would differ from an uncached run
            pool = self._train_pool()
            source = pool if pool is not None else self.train_set
            base = build_loader(source, self.batch_size, self.workers, shuffle=False,
                                generator=torch.Generator().manual_seed(self.seed))
            cached, where = self._cached_features(source, base, "train")
            count = f"{len(cached)} images"
            if pool is not None:
                count += (f" ({len(self.train_set)} training images x {pool.versions} "
                          f"versions: itself and its pseudo-anomaly pool)")
                cached = PoolSelection(cached, self.train_set)
            self.train_loader = build_loader(cached, self.batch_size, 0, shuffle=True,
                                             generator=self.loader_gen, sampler=self.sampler)
            self._train_cached = True
        else:
            base = build_loader(self.test_set, self.test_batch_size, self.workers,
                                shuffle=False, generator=torch.Generator().manual_seed(self.seed))
            cached, where = self._cached_features(self.test_set, base, "test")
            count = f"{len(cached)} images"
            self.test_loader = self._test_loader(cached, 0)
            self._test_cached = True
        self.net = SkipPrefix(self.model, len(self.model.frozen_prefix))
        self.train_net = self._wrap_train(self.net)
        self.logger.info(f"cached {'train' if train else 'test'} features of "
                         f"{', '.join(self.model.frozen_prefix)} for {count}, "
                         f"{where} ({time.time() - t0:.1f}s)")

    def _cached_features(self, dataset, loader, split):
        """In memory, or through ``trainer.feature_cache_dir`` on disk (rank 0 writes, the
        other ranks read). Returns the cached dataset and where it came from."""
        dtype = self._cache_dtype()
        desc = f"caching {split} features"
        cache_dir = self.cfg.trainer.get("feature_cache_dir")
        if not cache_dir:
            return build_feature_cache(self.model, loader, self.device, dtype, self.progress,
                                       desc), "computed"
        key = cache_key(self.model, dataset, self.cfg.net, dtype, split)
        path = Path(cache_dir) / f"{split}-{key[:32]}.pt"
        with du.main_process_first():
            cached = load_cache(path, key)
            if cached is not None and len(cached) == len(dataset):
                return cached, f"read from {path}"
            cached = build_feature_cache(self.model, loader, self.device, dtype, self.progress,
                                         desc)
            if self.is_main:
                save_cache(cached, path, key)
        return cached, f"computed and written to {path}"
