"""Measure DMAD's stage one: bank-building time, bank sizes, bank memory and peak memory, plus
the retrieval cost of inference and (``--train_epochs N``) the seconds of N training epochs, on
a config's real training data.

    python tools/benchmark_dmad.py --config experiments/demo/dmad.yaml [--out bench.json]
    python tools/benchmark_dmad.py --config experiments/MVTec-AD/dmad/lite.yaml \
        --data_root ../shared/data/mvtec_bottle_256 --class_name bottle --device cpu \
        --train_epochs 3 --baseline_opts net.2.kwargs.coreset_proj_dim=128 \
        dataset.train.pseudo_anomaly.pool=null

``--baseline_opts`` measures the config with those overrides first, then as given, in the same
process, and prints the ratios (this machine's load changes; ratios from one run compare).

Peak memory: the process's resident set sampled every 20 ms during the build (and its growth
over the pre-build level), plus ``torch.cuda.max_memory_allocated`` on CUDA. ``--opts`` changes
anything (e.g. ``net.2.kwargs.bank_memory_mb=64``); ``--limit N`` builds from N
evenly spaced training images only.
"""
import argparse
import platform
import sys
from pathlib import Path

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

from dualmem.tools._bench import PeakRSS, call_timed, timed, write_json  # noqa: E402
from dualmem.tools._common import add_data_args, add_device_args, apply_device_args  # noqa: E402
from dualmem.utils.run_plan import load_cfg  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/demo/dmad.yaml")
    p.add_argument("--class_name", default=None)
    add_data_args(p)
    add_device_args(p)
    p.add_argument("--limit", type=int, default=None, help="use N evenly spaced training images")
    p.add_argument("--infer_batches", type=int, default=2,
                   help="test batches timed for inference (0: skip)")
    p.add_argument("--train_epochs", type=int, default=0,
                   help="also time N training epochs (the engine's Trainer, banks reused)")
    p.add_argument("--opts", nargs="*", default=[])
    p.add_argument("--baseline_opts", nargs="*", default=None, metavar="KEY=VALUE",
                   help="measure the config with these overrides too, first, and print ratios")
    p.add_argument("--out", default="benchmark_dmad.json")
    args = p.parse_args(argv)
    if args.baseline_opts is None:
        result = measure(args, args.opts)
    else:
        base = measure(args, list(args.opts) + list(args.baseline_opts))
        result = measure(args, args.opts)
        result = {"baseline_opts": args.baseline_opts, "baseline": base, "current": result,
                  "ratios_current_over_baseline": _ratios(base, result)}
        for key, value in result["ratios_current_over_baseline"].items():
            print(f"{key}: current / baseline = {value:.3f}")
    write_json(args.out, result)
    return 0


RATIO_KEYS = ("build_seconds", "train_epoch_seconds_median", "train_seconds_total",
              "rss_peak_mb", "inference_img_per_s")


def _ratios(base, cur):
    return {k: cur[k] / base[k] for k in RATIO_KEYS if base.get(k) and cur.get(k) is not None}


def measure(args, opts):
    """One measurement of the config with ``opts``: a dict (also printed)."""

    import torch

    from dualmem.datasets.builder import build_datasets, build_loader
    from dualmem.datasets.manifest_dataset import ManifestDataset
    from dualmem.models import ModelHelper
    from dualmem.models.heads.dmad import DMAD
    from dualmem.utils.engine.stage_one import run_stage_one

    device = apply_device_args(args)
    args = argparse.Namespace(**{**vars(args), "opts": list(opts)})
    cfg = load_cfg(args, [args.class_name] if args.class_name else None)
    model = ModelHelper(cfg.net, input_size=cfg.dataset.input_size,
                        frozen_layers=cfg.get("frozen_layers")).to(device).eval()
    heads = [n for n in model.module_names if isinstance(getattr(model, n), DMAD)]
    if not heads:
        raise SystemExit(f"error: {args.config} has no DMAD module in net")
    head = getattr(model, heads[0])
    train_set, test_set, classes = build_datasets(cfg, model.pixel_mean, model.pixel_std,
                                                  args.class_name)
    base = getattr(train_set, "base", train_set)
    records = base.records
    if args.limit and args.limit < len(records):  # evenly spaced: every class keeps a share
        step = len(records) / args.limit
        records = [records[int(i * step)] for i in range(args.limit)]
    plain = ManifestDataset(records, base.image_dir, base.input_size, base.pixel_mean,
                            base.pixel_std, base.color_mode, resize=base.resize)
    batch_size = int(cfg.dataset.get("batch_size", 8))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        infos, build_s = call_timed(lambda: run_stage_one(
            model, train_set, device, batch_size=batch_size, progress=True, log=print,
            plain=plain))
        info = infos[heads[0]]
    result = {
        "config": str(args.config), "classes": classes, "device": str(device),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "input_size": list(cfg.dataset.input_size), "train_images": len(records),
        "build_seconds": build_s, "normal_bank": info["normal_bank"],
        "abnormal_bank": info["abnormal_bank"], "feature_dim": head.dim,
        "bank_mb": head.bank_nbytes() / 2 ** 20, "bank_memory_cap_mb": head.bank_memory_mb,
        "rss_before_mb": mem.start_mb, "rss_peak_mb": mem.peak_mb,
        "rss_growth_mb": mem.peak_mb - mem.start_mb, "build_info": info,
    }
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if args.infer_batches:
        loader = build_loader(test_set, batch_size, 0, shuffle=False)
        n, t_infer = 0, 0.0
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= args.infer_batches:
                    break
                x = {"image": batch["image"].to(device)}
                t_infer += timed(lambda: model(x), 1, device)[0]
                n += len(batch["index"])
        result["inference_images"] = n
        result["inference_img_per_s"] = n / t_infer if t_infer else None
    if args.train_epochs:
        result.update(time_training(cfg, model, device, args.class_name, args.train_epochs))
    print(f"DMAD banks from {len(records)} images ({', '.join(classes)}) on {device}: "
          f"{build_s:.1f} s; normal bank {result['normal_bank']} + abnormal bank "
          f"{result['abnormal_bank']} memories x {head.dim} dims = {result['bank_mb']:.2f} MB "
          f"(cap {head.bank_memory_mb:g} MB); RSS peak {mem.peak_mb:.0f} MB "
          f"(+{mem.peak_mb - mem.start_mb:.0f} MB during the build)"
          + (f"; CUDA peak {result['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in result else "")
          + (f"; inference {result['inference_img_per_s']:.2f} img/s"
             if result.get("inference_img_per_s") else "")
          + (f"; training epochs {', '.join(f'{t:.1f}' for t in result['train_epoch_seconds'])}"
             f" s ({result['train_cache']})" if args.train_epochs else "")
          + (f" [opts: {' '.join(opts)}]" if opts else ""))
    return result


def time_training(cfg, model, device, class_name, epochs):
    """Seconds of ``epochs`` training epochs by the engine's Trainer (feature cache, pool and
    retrieval memo as the config has them); the banks already built are loaded, not rebuilt.
    The first epoch includes building the feature cache."""
    import statistics
    import tempfile

    from dualmem.utils.engine import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg.trainer.max_epoch = max(int(cfg.trainer.max_epoch), epochs)
        trainer = Trainer(cfg, Path(tmp) / "run", device, class_name=class_name, progress=False)
        try:
            trainer.model.load_state_dict(model.state_dict())
            times = []
            for epoch in range(epochs):
                times.append(call_timed(lambda: trainer.train_one_epoch(epoch))[1])
            cache = "features cached" if trainer.use_cache else "no feature cache"
        finally:
            trainer.close()
    return {"train_epoch_seconds": times, "train_seconds_total": sum(times),
            "train_epoch_seconds_median": statistics.median(times), "train_cache": cache}


if __name__ == "__main__":
    sys.exit(main())
