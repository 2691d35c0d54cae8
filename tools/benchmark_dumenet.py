"""What DuMeNet's memories cost: train/eval throughput and peak memory relative to UniAD.

Same network for every variant (EfficientNet-Lite0 stages 1-4 -> MFCN stride 16 -> 4+4-layer
transformer, hidden 256, 7x7 neighbour mask), only the reconstruction head differs:
``uniad``, ``dumenet_global`` / ``dumenet_local`` (memory both, fusion concat, 256 + 256 slots,
global SSIM or an 11x11 Gaussian local SSIM), optionally ``dumenet_local7`` (7x7 window).
Random weights (speed does not depend on them).

Timing: variants interleaved round by round, the order rotating each round (a shared machine's
load and any first-in-round effect hit all of them alike),
median images/s (wall) and median process CPU seconds per image over the rounds; ratios are
variant / UniAD (throughput: < 1 is slower; CPU time and memory: > 1 is costlier). Train
step = forward + MSE loss + backward + AdamW step; eval = forward under
``torch.inference_mode``. Peak memory of one step after a warm-up step, each variant in a fresh
subprocess; CPU: peak RSS (VmHWM, reset before the step) and its growth over the RSS before the
step; CUDA: max allocated and its growth over the allocated memory before the step.

    python tools/benchmark_dumenet.py [--device cpu] [--batch 8] [--size 224] [--rounds 3]
        [--steps 2] [--variants uniad,dumenet_global,dumenet_local] [--out benchmark_dumenet.json]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dualmem.tools._bench import reset_peak_rss, status_mb, sync, timed, write_json  # noqa: E402
from dualmem.tools._common import add_device_args, apply_device_args  # noqa: E402
from dualmem.utils.misc import resolve_device  # noqa: E402

VARIANTS = {
    "uniad": ("UniAD", {}),
    "dumenet_global": ("UniADMemory", {"memory_mode": "both", "fusion_mode": "concat",
                                       "ssim_mode": "global"}),
    "dumenet_local": ("UniADMemory", {"memory_mode": "both", "fusion_mode": "concat",
                                      "ssim_mode": "local", "ssim_window": 11}),
    "dumenet_local7": ("UniADMemory", {"memory_mode": "both", "fusion_mode": "concat",
                                       "ssim_mode": "local", "ssim_window": 7}),
}


def build(variant, size, hidden, device):
    from dualmem.models import ModelHelper

    head, extra = VARIANTS[variant]
    net = [
        {"name": "backbone", "type": "models.backbones.efficientnet_lite0", "frozen": True,
         "kwargs": {"pretrained": False, "outlayers": [1, 2, 3, 4]}},
        {"name": "neck", "prev": "backbone", "type": "models.necks.MFCN",
         "kwargs": {"outstrides": [16]}},
        {"name": "reconstruction", "prev": "neck", "type": f"models.reconstructions.{head}",
         "kwargs": {"hidden_dim": hidden, "nhead": 8, "num_encoder_layers": 4,
                    "num_decoder_layers": 4, "dim_feedforward": 4 * hidden, "dropout": 0.1,
                    "feature_jitter": {"scale": 20.0, "prob": 1.0},
                    "neighbor_mask": {"neighbor_size": [7, 7], "mask": [True, True, True]},
                    "initializer": {"method": "xavier_uniform"}, **extra}},
    ]
    model = ModelHelper(net, input_size=[size, size]).to(device)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    return model, opt


def train_step(model, opt, image):
    model.train()
    out = model({"image": image})
    loss = F.mse_loss(out["feature_rec"], out["feature_align"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def eval_step(model, image):
    model.eval()
    with torch.inference_mode():
        model({"image": image})


def memory_child(args):
    """One variant, one mode, in this fresh process: prints the peak as JSON."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, opt = build(args.variant, args.size, args.hidden, device)
    image = torch.randn(args.batch, 3, args.size, args.size, device=device)
    step = (lambda: train_step(model, opt, image)) if args.mode == "train" else \
        (lambda: eval_step(model, image))
    if device.type == "cuda":
        step()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2 ** 20
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        step()  # first-step allocations (optimizer state, allocator pools) count as setup
        base = status_mb("VmRSS")
        reset_peak_rss()
        step()
        peak = status_mb("VmHWM")
    print(json.dumps({"peak_mb": peak, "base_mb": base, "extra_mb": peak - base}))


def measure_memory(args, variant, mode):
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", variant, mode,
           "--device", args.device, "--batch", str(args.batch), "--size", str(args.size),
           "--hidden", str(args.hidden), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed train+eval steps per variant")
    p.add_argument("--variants", default="uniad,dumenet_global,dumenet_local")
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    p.add_argument("--out", default="benchmark_dumenet.json")
    p.add_argument("--_child", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    apply_device_args(args)
    args.threads = torch.get_num_threads()  # the memory children run with the same count
    args.device = str(resolve_device(args.device))
    if args._child:
        args.variant, args.mode = args._child
        return memory_child(args)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "uniad" not in variants:
        p.error(f"--variants must include 'uniad' and name only {list(VARIANTS)}; "
                f"got {variants}")
    device = torch.device(args.device)
    image = torch.randn(args.batch, 3, args.size, args.size, device=device)
    built = {}
    for v in variants:
        torch.manual_seed(0)
        built[v] = build(v, args.size, args.hidden, device)
    for _ in range(args.warmup):  # allocator, kernels, optimizer state; interleaved as well
        for v in variants:
            train_step(*built[v], image)
            eval_step(built[v][0], image)
    rates = {v: {m: [] for m in ("train", "eval", "train_cpu", "eval_cpu")} for v in variants}
    n_img = args.batch * args.steps
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            model, opt = built[v]
            for mode, fn in (("train", lambda: train_step(model, opt, image)),
                             ("eval", lambda: eval_step(model, image))):
                wall, cpu = timed(fn, args.steps, device)
                rates[v][mode].append(n_img / wall)
                rates[v][f"{mode}_cpu"].append(cpu / n_img)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v} train {rates[v]['train'][-1]:.1f} eval {rates[v]['eval'][-1]:.1f} img/s"
            for v in variants), flush=True)
    results = {}
    for v in variants:
        n = sum(p.numel() for p in built[v][0].trainable_parameters())
        results[v] = {"trainable_params_m": n / 1e6,
                      "train_img_s": statistics.median(rates[v]["train"]),
                      "eval_img_s": statistics.median(rates[v]["eval"]),
                      "train_cpu_s_per_img": statistics.median(rates[v]["train_cpu"]),
                      "eval_cpu_s_per_img": statistics.median(rates[v]["eval_cpu"]),
                      "rounds": rates[v]}
    del built
    if not args.no_memory:
        for v in variants:
            for mode in ("train", "eval"):
                results[v][f"{mode}_memory"] = measure_memory(args, v, mode)
    base = results["uniad"]
    ratios = {}
    for v in variants:
        if v == "uniad":
            continue
        r = {"train_throughput": results[v]["train_img_s"] / base["train_img_s"],
             "eval_throughput": results[v]["eval_img_s"] / base["eval_img_s"],
             "train_cpu_time": results[v]["train_cpu_s_per_img"] / base["train_cpu_s_per_img"],
             "eval_cpu_time": results[v]["eval_cpu_s_per_img"] / base["eval_cpu_s_per_img"]}
        if not args.no_memory:
            for mode in ("train", "eval"):
                r[f"{mode}_peak_memory"] = (results[v][f"{mode}_memory"]["peak_mb"] /
                                            base[f"{mode}_memory"]["peak_mb"])
                r[f"{mode}_extra_memory"] = (results[v][f"{mode}_memory"]["extra_mb"] /
                                             max(base[f"{mode}_memory"]["extra_mb"], 1e-6))
        ratios[v] = r
    report = {
        "settings": {"device": str(device), "batch": args.batch, "size": args.size,
                     "hidden_dim": args.hidden, "backbone": "efficientnet_lite0 (stages 1-4)",
                     "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                     "threads": args.threads,
                     "memory": "peak RSS (VmHWM) of one step / its growth over the RSS before"
                     if device.type == "cpu" else "torch.cuda.max_memory_allocated"},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "cpu_count": os.cpu_count(),
                        "load_avg": os.getloadavg(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
                        else None},
        "results": results,
        "ratios_vs_uniad": ratios,
    }
    print(f"\n{'variant':16s} {'train img/s':>12s} {'eval img/s':>11s} {'train x':>8s} "
          f"{'eval x':>7s} {'train cpu x':>12s} {'eval cpu x':>11s} {'train peak MB':>14s} "
          f"{'peak x':>7s} {'growth x':>9s}")
    for v in variants:
        r = ratios.get(v, {})
        mem = results[v].get("train_memory", {}).get("peak_mb", float("nan"))
        print(f"{v:16s} {results[v]['train_img_s']:12.2f} {results[v]['eval_img_s']:11.2f} "
              f"{r.get('train_throughput', 1.0):8.2f} {r.get('eval_throughput', 1.0):7.2f} "
              f"{r.get('train_cpu_time', 1.0):12.2f} {r.get('eval_cpu_time', 1.0):11.2f} "
              f"{mem:14.0f} {r.get('train_peak_memory', 1.0):7.2f} "
              f"{r.get('train_extra_memory', 1.0):9.2f}")
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
