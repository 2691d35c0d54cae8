"""From a config to data loaders: manifests located (or generated), classes chosen, loaders built."""
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dualmem.datasets.manifest import read_manifest
from dualmem.datasets.manifest_dataset import Augment, ManifestDataset
from dualmem.utils.config_defaults import input_settings
from dualmem.utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_synthetic_root():
    """``data/synthetic`` of the checkout; installed from a wheel (no checkout: no configs/
    beside the code) ``data/synthetic`` of the working directory, never site-packages."""
    base = REPO_ROOT if (REPO_ROOT / "configs").is_dir() else Path.cwd()
    return base / "data" / "synthetic"


from dualmem.datasets.prepare import SOURCES as PREPARED_TYPES  # noqa: E402  (the one list)


def data_roots(cfg):
    """``dataset.data_root`` (a path or a list) as absolute paths; relative ones are relative
    to the config's folder, as every other path in a config."""
    value = cfg.dataset.get("data_root")
    if not value:
        return []
    roots = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    base = Path(cfg.get("config_path") or ".").resolve()
    base = base.parent if base.suffix else base
    return [str(p if Path(p).is_absolute() else (base / p).resolve())
            for p in (Path(os.path.expanduser(str(r))) for r in roots)]


def source_options(ds):
    """Builder options from the config: the CIFAR-10 protocol, the folder split."""
    kind = ds.get("type")
    if kind == "cifar10":
        opts = dict(ds.get("cifar10") or {})
        return {"normal_classes": list(opts.get("normal_classes", [0, 1, 2, 3, 4])),
                "seed": int(opts.get("seed", 0))}
    if kind == "folder":
        opts = dict(ds.get("folder") or {})
        return {k: opts[k] for k in ("test_split", "seed", "class_name") if k in opts}
    return {}


def locate_manifests(cfg, classes=None, log=None):
    """(train_meta, test_meta, image_dir).

    ``dataset.type: synthetic`` generates the demo data on first use; ``mvtec | visa |
    cifar10 | ader | folder`` with ``dataset.data_root`` prepares (and caches) manifests from
    the data itself; otherwise ``dataset.train/test.meta_file`` name existing manifests.
    """
    ds = cfg.dataset
    kind = ds.get("type")
    if kind == "synthetic":
        from dualmem.datasets.synthetic import ensure_synthetic_dataset

        params = dict(ds.get("synthetic") or {})
        root = Path(params.pop("root", None) or default_synthetic_root())
        ensure_synthetic_dataset(root, **params)
        return str(root / "train.json"), str(root / "test.json"), str(root)
    roots = data_roots(cfg)
    if kind in PREPARED_TYPES and roots:
        from dualmem.datasets.prepare.cache import prepare_manifests

        found = prepare_manifests(kind, roots, None if kind == "cifar10" else classes,
                                  source_options(ds), cache_dir=ds.get("cache_dir"),
                                  check_files=ds.get("check_files", True), log=log)
        return found.train, found.test, found.image_dir
    if roots:
        raise UserError(f"dataset.data_root is set but dataset.type is "
                         f"'{kind or 'explicit'}'; set dataset.type to one of "
                         f"{', '.join(PREPARED_TYPES)} (or pass --data_type)")
    image_dir = ((ds.get("image_reader") or {}).get("kwargs") or {}).get("image_dir")
    train_meta = (ds.get("train") or {}).get("meta_file")
    test_meta = (ds.get("test") or {}).get("meta_file")
    for key, path in (("dataset.train.meta_file", train_meta),
                      ("dataset.test.meta_file", test_meta)):
        if not path:
            hint = (f" (or dataset.data_root / --data_root DIR for dataset.type '{kind}')"
                    if kind in PREPARED_TYPES else "")
            raise UserError(f"config key '{key}' is required for dataset.type "
                             f"'{kind or 'explicit'}'{hint}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}: manifest not found: {path}")
    return train_meta, test_meta, image_dir


def select_classes(records, classes, source):
    present = sorted({r["clsname"] for r in records})
    if not classes:
        return records, present
    missing = [c for c in classes if c not in present]
    if missing:
        raise UserError(f"class {', '.join(repr(c) for c in missing)} not in {source} "
                         f"(classes there: {', '.join(present)})")
    keep = set(classes)
    return [r for r in records if r["clsname"] in keep], [c for c in present if c in keep]


def subsample(records, n, seed):
    """``n`` records drawn by seed, stratified by (class, label) so a short run keeps every
    class and both labels in proportion (at least one of each group while n allows)."""
    if not n or n >= len(records):
        return records
    if n < 0:
        raise UserError(f"subsample must be positive, got {n}")
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault((r["clsname"], int(r["label"])), []).append(i)
    keys = sorted(groups)
    sizes = {k: len(groups[k]) for k in keys}
    # largest-remainder allocation, then at least one per group while the budget lasts
    quota = {k: n * sizes[k] / len(records) for k in keys}
    take = {k: int(quota[k]) for k in keys}
    for k in sorted(keys, key=lambda k: quota[k] - take[k], reverse=True)[:n - sum(take.values())]:
        take[k] += 1
    for k in keys:
        if take[k] == 0 and n >= len(keys):
            donor = max(keys, key=lambda j: take[j])
            take[donor] -= 1
            take[k] = 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for k in keys:
        idx = groups[k]
        perm = torch.randperm(len(idx), generator=g)[:take[k]].tolist()
        chosen += [idx[j] for j in perm]
    return [records[i] for i in sorted(chosen)]


def build_datasets(cfg, pixel_mean, pixel_std, class_name=None):
    """Returns (train_set, test_set, classes)."""
    ds = cfg.dataset
    classes = [class_name] if class_name else ds.get("classes")
    # prepared manifests cover the configured classes, so a per-class sweep prepares (and
    # checks) its dataset once rather than once per class
    train_meta, test_meta, image_dir = locate_manifests(
        cfg, ds.get("classes") or classes, log=logging.getLogger("dualmem").info)
    train_records, train_classes = select_classes(read_manifest(train_meta), classes, train_meta)
    test_records, test_classes = select_classes(read_manifest(test_meta), classes, test_meta)
    if not train_records:
        raise UserError(f"no training images in {train_meta}")
    if not test_records:
        raise UserError(f"no test images in {test_meta}")
    seed = cfg.get("random_seed", 0)
    train_cfg, test_cfg = ds.get("train") or {}, ds.get("test") or {}
    train_records = subsample(train_records, train_cfg.get("subsample"), seed)
    test_records = subsample(test_records, test_cfg.get("subsample"), seed + 1)
    # DMAD's semi-supervised protocol: k annotated anomalies per class move from test to train
    from dualmem.datasets.seen_anomalies import apply_seen_anomalies, refuse_scored_anomalies
    train_records, test_records, seen = apply_seen_anomalies(ds, train_records, test_records,
                                                             data_roots(cfg))
    refuse_scored_anomalies(train_records, test_records, image_dir)
    color_mode, resize = input_settings(cfg)
    augment = Augment(train_cfg.get("hflip", False), train_cfg.get("vflip", False),
                      train_cfg.get("rotate", False), train_cfg.get("color_jitter"))
    common = dict(image_dir=image_dir, input_size=ds.input_size, pixel_mean=pixel_mean,
                  pixel_std=pixel_std, color_mode=color_mode, resize=resize)
    from dualmem.datasets.holdout import hold_out_goods  # goods kept apart for thresholds (#26)
    train_records, holdout = hold_out_goods(cfg, train_records, test_records, common,
                                            data_roots(cfg), seed)
    train_set = ManifestDataset(train_records, augment=augment if augment.active else None,
                                **common)
    from dualmem.datasets.pseudo_anomaly import wrap_pseudo_anomalies  # dataset.train.pseudo_anomaly
    train_set = wrap_pseudo_anomalies(train_set, train_cfg.get("pseudo_anomaly"), seed)
    train_set.seen_anomalies = seen  # recorded in the results' protocol
    train_set.holdout = holdout  # None, or datasets.holdout.HeldOut (scored, never trained)
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
