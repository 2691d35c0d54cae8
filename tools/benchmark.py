"""Throughput, memory and FLOPs of a config's model, as JSON and a table.

    python tools/benchmark.py --config experiments/MVTec-AD/uniad/config.yaml --compare

Random weights and random images (nothing to download); batch and size from the config.
``--compare`` measures, in one process and on the same weights, the reference-style path
(backbone recomputed every step, UniAD's sequence-first attention with its mask rebuilt every
forward) against the fast path (frozen-prefix features cached, batch-first SDPA with the mask
built once), and a bf16 autocast variant of the fast path; it checks the anomaly maps agree.
"""
import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402


class PeakRSS:
    """Peak resident memory of this process during a block (sampled from /proc)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self):
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def matmul_flops_per_s(device, dtype, n=1024, repeat=5):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeat / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def build(cfg, device, attn_impl):
    from models import ModelHelper

    model = ModelHelper(cfg.net, input_size=cfg.dataset.input_size,
                        frozen_layers=cfg.get("frozen_layers")).to(device)
    for module in model.modules():
        if hasattr(module, "set_attn_impl"):
            module.set_attn_impl(attn_impl)
    return model


def measure(model, images, device, steps, cached, amp_dtype, lr=1e-4):
    """Train steps/s and eval images/s for one path; returns figures and eval maps."""
    from models.losses import Criterion

    criterion = Criterion([{"name": "mse", "type": "FeatureMSELoss"}])
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr)
    start = len(model.frozen_prefix) if cached else 0
    if cached:  # what the feature cache hands the head
        with torch.no_grad():
            data = {"image": images}
            for name in model.frozen_prefix:
                data.update(getattr(model, name)(data))
        inputs = {k: v for k, v in data.items() if k != "image"}
    else:
        inputs = {"image": images}

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = criterion(model(inputs, start=start))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    step()  # warm-up
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        train_s = (time.perf_counter() - t) / steps
    flops = count_flops(step)
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype,
                                         enabled=amp_dtype is not None):
        model({"image": images})
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            pred = model({"image": images})["pred"]
        sync(device)
        eval_s = (time.perf_counter() - t) / steps
    b = images.shape[0]
    out = {"train_img_per_s": b / train_s, "eval_img_per_s": b / eval_s,
           "train_step_gflop": flops / 1e9, "achieved_gflop_per_s": flops / train_s / 1e9,
           "peak_rss_mb": mem.peak / 2 ** 20}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out, pred.float()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--compare", action="store_true", help="reference vs fast vs bf16")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmark.json")
    p.add_argument("--opts", nargs="*", default=[])
    args = p.parse_args(argv)

    from utils.config import load_config
    from utils.misc import resolve_device

    cfg = load_config(args.config, ["net.0.kwargs.pretrained=false"] + args.opts)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch_size or cfg.dataset.get("batch_size", 8)
    h, w = cfg.dataset.input_size
    images = torch.randn(b, 3, h, w, device=device)
    variants = [("fast fp32", "sdpa", True, None)]
    if args.compare:
        variants = [("reference fp32", "reference", False, None)] + variants + \
                   [("fast bf16", "sdpa", True, torch.bfloat16)]
    model = build(cfg, device, "sdpa")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.trainable_parameters())
    results, maps = {}, {}
    for name, impl, cached, dtype in variants:
        model.load_state_dict(state)  # every path starts from the same weights
        for module in model.modules():
            if hasattr(module, "set_attn_impl"):
                module.set_attn_impl(impl)
        dt = dtype or torch.float32
        peak = matmul_flops_per_s(device, dt)
        figures, maps[name] = measure(model, images, device, args.steps, cached, dtype)
        figures["matmul_gflop_per_s"] = peak / 1e9
        figures["fraction_of_matmul"] = figures["achieved_gflop_per_s"] * 1e9 / peak
        results[name] = figures
        print(f"{name}: {json.dumps({k: round(v, 3) for k, v in figures.items()})}", flush=True)
    # same weights, one eval pass each: do the paths compute the same maps?
    model.load_state_dict(state)
    model.eval()
    check = {}
    with torch.no_grad():
        for name, impl, _, dtype in variants:
            for module in model.modules():
                if hasattr(module, "set_attn_impl"):
                    module.set_attn_impl(impl)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                check[name] = model({"image": images})["pred"].float()
    base = check[variants[0][0]]
    for name in check:
        results[name]["max_abs_map_diff_vs_first"] = float((check[name] - base).abs().max())
    first = variants[0][0]
    for name in results:
        results[name]["train_speedup_vs_first"] = (results[name]["train_img_per_s"] /
                                                   results[first]["train_img_per_s"])
    summary = {"config": str(args.config), "device": str(device),
               "threads": torch.get_num_threads(), "batch_size": b, "input_size": [h, w],
               "parameters": n_params, "trainable_parameters": n_train, "variants": results}
    Path(args.out).write_text(json.dumps(summary, indent=2))
    cols = ["train_img_per_s", "eval_img_per_s", "train_speedup_vs_first", "train_step_gflop",
            "achieved_gflop_per_s", "fraction_of_matmul", "peak_rss_mb",
            "max_abs_map_diff_vs_first"]
    table = [[name] + [f"{results[name][c]:.4g}" for c in cols] for name in results]
    print(f"\n{args.config}: batch {b}, {h}x{w}, {device}, {torch.get_num_threads()} threads, "
          f"{n_params / 1e6:.2f} M parameters ({n_train / 1e6:.2f} M trainable)")
    print(tabulate(table, headers=["path"] + cols, tablefmt="github"))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
