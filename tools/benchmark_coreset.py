"""Measure the normal bank's greedy coreset as classes are added: seconds and covering radius of
the one-pick-per-pass selection (before) and the batched one (now), in one run.

    python tools/benchmark_coreset.py --config experiments/MVTec-AD/dmad/lite.yaml \
        --data_root ../shared/data/mvtec_bottle_256 --data_root ../shared/data/mvtec_screw_256 \
        --threads 2 --out coreset.json
    python tools/benchmark_coreset.py --synthetic 20000   # no data: Gaussian classes

Patch features come from the config's frozen prefix (backbone + neck) on every training image
of every class; "4 classes' worth" repeats the real classes with their images flipped left to
right (new patches, the same statistics). Every row uses the config's ``coreset_ratio`` and
``coreset_proj_dim``; the covering radius (largest distance from a patch to its nearest chosen
patch, in the projected space) is reported over all patches and per class, with each class's
share of the memories.
"""
import argparse
import platform
import sys

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

from dualmem.tools._bench import call_timed, write_json  # noqa: E402
from dualmem.tools._common import add_data_args, add_device_args, apply_device_args  # noqa: E402
from dualmem.utils.run_plan import load_cfg  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/MVTec-AD/dmad/lite.yaml")
    add_data_args(p)
    add_device_args(p)
    p.add_argument("--worth", type=int, nargs="+", default=[1, 2, 4],
                   help="how many classes' worth of patches each row selects from")
    p.add_argument("--synthetic", type=int, default=0, metavar="ROWS",
                   help="Gaussian classes of ROWS patches each instead of real features")
    p.add_argument("--ratio", type=float, default=None, help="default: the config's")
    p.add_argument("--proj_dim", type=int, default=None, help="default: the config's")
    p.add_argument("--skip_stepwise_over", type=int, default=None, metavar="ROWS",
                   help="time only the batched selection above ROWS patches")
    p.add_argument("--opts", nargs="*", default=[])
    p.add_argument("--out", default="benchmark_coreset.json")
    return p.parse_args(argv)


def head_settings(cfg):
    for entry in cfg.net:
        kwargs = entry.get("kwargs") or {}
        if "coreset_ratio" in kwargs or str(entry.get("type", "")).endswith(("DMAD", "PatchCore")):
            return float(kwargs.get("coreset_ratio", 0.02)), int(kwargs.get("coreset_proj_dim",
                                                                             128) or 0)
    return 0.02, 128


def real_features(cfg, device):
    """{class: (rows, C)} patch features of the training images (and their mirror images)."""
    import torch

    from dualmem.datasets.builder import build_datasets, build_loader
    from dualmem.models import ModelHelper

    model = ModelHelper(cfg.net, input_size=cfg.dataset.input_size,
                        frozen_layers=cfg.get("frozen_layers")).to(device).eval()
    stop = len(model.frozen_prefix)
    train_set, _, classes = build_datasets(cfg, model.pixel_mean, model.pixel_std)
    base = getattr(train_set, "base", train_set)
    loader = build_loader(base, 8, 0, shuffle=False)
    feats, flipped = {c: [] for c in classes}, {c: [] for c in classes}
    with torch.no_grad():
        for batch in loader:
            for images, store in ((batch["image"], feats),
                                  (torch.flip(batch["image"], dims=[3]), flipped)):
                out = model.prefix_outputs(images.to(device), stop)
                x = out["feature_align"] if "feature_align" in out else next(iter(out.values()))
                rows = x.permute(0, 2, 3, 1).reshape(len(images), -1, x.shape[1]).cpu()
                for name, r in zip(batch["clsname"], rows):
                    store[name].append(r)
    real = {c: torch.cat(v) for c, v in feats.items()}
    mirror = {f"{c} (flipped)": torch.cat(v) for c, v in flipped.items()}
    return real, mirror


def synthetic_features(rows, classes=4, dim=256, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(classes):  # classes of different spread: a share by count would be wrong
        centre = torch.randn(dim, generator=g) * 4
        out[f"class{i}"] = centre + torch.randn(rows, dim, generator=g) * (0.5 + i)
    return out, {}


def per_class_radius(x, sel, cls, names, proj_dim, seed):
    """Covering radius per class in the projected space the selection used."""
    from dualmem.models.heads.memory_bank import _project, knn

    p = _project(x, proj_dim, seed)
    d, _ = knn(p, p[sel], 1)
    d = d[:, 0]
    return {n: float(d[cls == i].max()) for i, n in enumerate(names)}, float(d.max())


def measure(features, worth, ratio, proj_dim, skip_over):
    import torch

    from dualmem.models.heads.memory_bank import greedy_coreset, greedy_coreset_stepwise

    names = list(features)[:worth]
    x = torch.cat([features[n] for n in names]).float()
    cls = torch.cat([torch.full((features[n].shape[0],), i) for i, n in enumerate(names)])
    n = max(1, int(round(ratio * x.shape[0])))
    row = {"classes": names, "patches": int(x.shape[0]), "memories": n}
    variants = [("batched", greedy_coreset)]
    if not skip_over or x.shape[0] <= skip_over:
        variants.insert(0, ("stepwise", greedy_coreset_stepwise))
    for label, fn in variants:
        (sel, _), seconds = call_timed(lambda: fn(x, n, proj_dim=proj_dim, seed=0))
        radii, radius = per_class_radius(x, sel, cls, names, proj_dim, 0)
        share = torch.bincount(cls[sel], minlength=len(names)).tolist()
        row[label] = {"seconds": seconds, "radius": radius, "class_radius": radii,
                      "class_memories": dict(zip(names, share))}
        print(f"{len(names)} class(es), {x.shape[0]} patches -> {n} memories, {label}: "
              f"{seconds:.1f} s, covering radius {radius:.4f} "
              f"({', '.join(f'{k} {v:.4f} / {m}' for (k, v), m in zip(radii.items(), share))})",
              flush=True)
    if "stepwise" in row:
        row["speedup"] = row["stepwise"]["seconds"] / row["batched"]["seconds"]
        print(f"  batched is {row['speedup']:.2f}x faster", flush=True)
    return row


def main(argv=None):
    import torch

    args = parse_args(argv)
    device = apply_device_args(args)
    if args.synthetic:
        features, extra = synthetic_features(args.synthetic)
        ratio, proj_dim = args.ratio or 0.02, args.proj_dim if args.proj_dim is not None else 64
        source = f"synthetic: Gaussian classes of {args.synthetic} rows, 256 dims"
    else:
        cfg = load_cfg(args)
        ratio, proj_dim = head_settings(cfg)
        ratio = args.ratio or ratio
        proj_dim = args.proj_dim if args.proj_dim is not None else proj_dim
        (features, extra), seconds = call_timed(lambda: real_features(cfg, device))
        print(f"features of {', '.join(features)}: {seconds:.1f} s", flush=True)
        source = f"{args.config}: training images of {', '.join(features)}, then mirrored"
    features = {**features, **extra}
    rows = [measure(features, w, ratio, proj_dim, args.skip_stepwise_over)
            for w in args.worth if w <= len(features)]
    result = {"source": source, "ratio": ratio, "proj_dim": proj_dim, "device": str(device),
              "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
              "rows": rows}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
