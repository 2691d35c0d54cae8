"""From a config to data loaders: manifests located (or generated), classes chosen, loaders built."""
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from datasets.manifest import read_manifest
from datasets.manifest_dataset import Augment, ManifestDataset

REPO_ROOT = Path(__file__).resolve().parent.parent


def locate_manifests(cfg):
    """(train_meta, test_meta, image_dir); generates the synthetic demo data on first use."""
    ds = cfg.dataset
    if ds.get("type") == "synthetic":
        from datasets.synthetic import ensure_synthetic_dataset

        params = dict(ds.get("synthetic") or {})
        root = Path(params.pop("root", None) or REPO_ROOT / "data" / "synthetic")
        ensure_synthetic_dataset(root, **params)
        return str(root / "train.json"), str(root / "test.json"), str(root)
    image_dir = ((ds.get("image_reader") or {}).get("kwargs") or {}).get("image_dir")
    train_meta = (ds.get("train") or {}).get("meta_file")
    test_meta = (ds.get("test") or {}).get("meta_file")
    for key, path in (("dataset.train.meta_file", train_meta),
                      ("dataset.test.meta_file", test_meta)):
        if not path:
            raise ValueError(f"config key '{key}' is required for dataset.type "
                             f"'{ds.get('type', 'explicit')}'")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}: manifest not found: {path}")
    return train_meta, test_meta, image_dir


def select_classes(records, classes, source):
    present = sorted({r["clsname"] for r in records})
    if not classes:
        return records, present
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(f"class {', '.join(repr(c) for c in missing)} not in {source} "
                         f"(classes there: {', '.join(present)})")
    keep = set(classes)
    return [r for r in records if r["clsname"] in keep], [c for c in present if c in keep]


def subsample(records, n, seed):
    if not n or n >= len(records):
        return records
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(records), generator=g)[:n].sort().values.tolist()
    return [records[i] for i in idx]


def build_datasets(cfg, pixel_mean, pixel_std, class_name=None):
    """Returns (train_set, test_set, classes)."""
    ds = cfg.dataset
    train_meta, test_meta, image_dir = locate_manifests(cfg)
    classes = [class_name] if class_name else ds.get("classes")
    train_records, train_classes = select_classes(read_manifest(train_meta), classes, train_meta)
    test_records, test_classes = select_classes(read_manifest(test_meta), classes, test_meta)
    if not train_records:
        raise ValueError(f"no training images in {train_meta}")
    if not test_records:
        raise ValueError(f"no test images in {test_meta}")
    seed = cfg.get("random_seed", 0)
    train_cfg, test_cfg = ds.get("train") or {}, ds.get("test") or {}
    train_records = subsample(train_records, train_cfg.get("subsample"), seed)
    test_records = subsample(test_records, test_cfg.get("subsample"), seed + 1)
    color_mode = ((ds.get("image_reader") or {}).get("kwargs") or {}).get("color_mode", "RGB")
    augment = Augment(train_cfg.get("hflip", False), train_cfg.get("vflip", False),
                      train_cfg.get("rotate", False), train_cfg.get("color_jitter"))
    common = dict(image_dir=image_dir, input_size=ds.input_size, pixel_mean=pixel_mean,
                  pixel_std=pixel_std, color_mode=color_mode)
    train_set = ManifestDataset(train_records, augment=augment if augment.active else None,
                                **common)
    test_set = ManifestDataset(test_records, **common)
    return train_set, test_set, test_classes or train_classes


def collate(batch):
    out = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        out[key] = torch.stack(values) if torch.is_tensor(values[0]) else \
            torch.tensor(values) if isinstance(values[0], int) else values
    return out


def build_loader(dataset, batch_size, workers, shuffle, generator=None, sampler=None,
                 drop_last=False):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers, collate_fn=collate,
                      generator=generator, drop_last=drop_last,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
