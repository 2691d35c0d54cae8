"""Throughput, memory and FLOPs of a config's model, as JSON and a table.

    python tools/benchmark.py --config experiments/MVTec-AD/uniad/config.yaml --compare

Random weights and random images (nothing to download); batch and size from the config; the
loss is the config's ``criterion``. ``--compare`` measures, in one process and on the same
weights, the reference-style path (backbone recomputed every step, UniAD's sequence-first
attention with its mask rebuilt every forward, standard dropout) against the fast path (frozen
prefix cached, batch-first attention with the mask built once, run a few heads at a time on CPU,
and SplitMix64 dropout masks) and a bf16 autocast variant of the fast path; it checks the
anomaly maps agree. ``--channels_last`` and ``--compile`` add those variants of the fast path.
Variants are timed in interleaved rounds (each round measures the matmul reference, then runs
every variant in turn, one untimed step or pass first) and the medians are reported, so a load
change on a shared machine does not favour one of them. Heads with a stage one (DMAD's memory
banks) are filled from random images first.
"""
import argparse
import statistics
import sys

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from dualmem.tools._bench import PeakRSS, call_timed, timed, write_json  # noqa: E402
from dualmem.tools._common import add_device_args  # noqa: E402


def matmul_flops_per_s(device, dtype, n=1024, repeat=5):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n ** 3 * repeat / timed(lambda: a @ b, repeat, device)[0]


def count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def build(cfg, device, attn_impl, channels_last=False):
    from dualmem.models import ModelHelper

    model = ModelHelper(cfg.net, input_size=cfg.dataset.input_size,
                        frozen_layers=cfg.get("frozen_layers")).to(device)
    for module in model.modules():
        if hasattr(module, "set_attn_impl"):
            module.set_attn_impl(attn_impl)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


class RandomImages(torch.utils.data.Dataset):
    """Normal-looking stand-ins for a training set (what bank-building heads read): fixed
    random images, one class, ManifestDataset's item layout."""

    def __init__(self, n, input_size, pixel_mean, pixel_std, seed=0):
        self.n, self.input_size = n, tuple(input_size)
        self.pixel_mean, self.pixel_std = pixel_mean or [0.5] * 3, pixel_std or [0.5] * 3
        self.records = [{"filename": f"random/{i}.png", "label": 0, "clsname": "random"}
                        for i in range(n)]
        self.seed = seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed + i)
        image01 = torch.rand(3, *self.input_size, generator=g)
        mean = torch.tensor(self.pixel_mean).view(3, 1, 1)
        std = torch.tensor(self.pixel_std).view(3, 1, 1)
        return {"image": (image01 - mean) / std, "mask": torch.zeros(1, *self.input_size),
                "label": 0, "clsname": "random", "filename": self.records[i]["filename"],
                "index": i}


def prepare_banks(model, cfg, device, n_images):
    """Heads with a stage one (DMAD's memory banks) are filled from random images first, so
    their training step and retrieval cost are realistic; returns the build seconds."""
    from dualmem.utils.engine.stage_one import run_stage_one, stage_one_modules

    if not stage_one_modules(model):
        return None
    data = RandomImages(n_images, cfg.dataset.input_size, model.pixel_mean, model.pixel_std)
    model.eval()
    return call_timed(lambda: run_stage_one(model, data, device,
                                            batch_size=cfg.dataset.get("batch_size", 8),
                                            progress=False, plain=data))[1]


def batch_fields(b, size, device, seed=0):
    """What a training batch carries besides the image: half the images with a rectangular
    anomaly mask (heads trained on masks need both kinds), labels, class names, indices."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    mask = torch.zeros(b, 1, h, w)
    for i in range(0, b, 2):
        y, x = torch.randint(0, h // 2, (2,), generator=g).tolist()
        mask[i, :, y:y + h // 4, x:x + w // 4] = 1
    return {"mask": mask.to(device), "label": (mask.flatten(1).amax(1) > 0).long().to(device),
            "clsname": ["random"] * b, "index": torch.arange(b, device=device)}


class Variant:
    """One way of running the same weights: attention implementation, cache, dtype, layout,
    compilation. Holds its own model copy and optimizer so variants can be interleaved."""

    def __init__(self, name, cfg, state, images, fields, device, attn_impl="sdpa", cached=True,
                 amp_dtype=None, channels_last=False, compile=False, lr=1e-4):
        from dualmem.models.losses import Criterion

        self.name, self.device, self.amp_dtype = name, device, amp_dtype
        self.model = build(cfg, device, attn_impl, channels_last)
        self.model.load_state_dict(state)  # every path starts from the same weights
        self.criterion = Criterion(cfg.get("criterion") or
                                   [{"name": "mse", "type": "FeatureMSELoss"}])
        self.opt = torch.optim.AdamW(self.model.trainable_parameters(), lr=lr)
        self.images = images.contiguous(memory_format=torch.channels_last) \
            if channels_last else images
        self.start = len(self.model.frozen_prefix) if cached else 0
        self.inputs = dict(fields, image=self.images)
        if cached:  # what the feature cache hands the head
            with torch.no_grad():
                data = {"image": self.images}
                for name in self.model.frozen_prefix:
                    data.update(getattr(self.model, name)(data))
            self.inputs = dict(fields, **{k: v for k, v in data.items() if k != "image"})
        self.forward = torch.compile(self.model) if compile else self.model
        self.train_times, self.eval_times = [], []

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def step(self):
        with self.autocast():
            loss, _ = self.criterion(self.forward(self.inputs, start=self.start))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def predict(self):
        with torch.no_grad(), self.autocast():
            return self.forward({"image": self.images})["pred"]

    def warm_up(self):
        self.model.train()
        self.step()
        self.model.eval()
        self.predict()

    def _seconds_per_call(self, fn, steps):
        return timed(fn, steps, self.device)[0] / steps

    def time_train(self, steps, record=True):
        self.model.train()
        if record:  # one untimed step first: the variant before may have left the heap cold
            self.step()
        seconds = self._seconds_per_call(self.step, steps)
        if record:
            self.train_times.append(seconds)

    def time_eval(self, steps):
        self.model.eval()
        self.predict()  # untimed, as for training
        self.eval_times.append(self._seconds_per_call(self.predict, steps))

    def flops(self):
        self.model.train()
        return count_flops(self.step)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--compare", action="store_true", help="reference vs fast vs bf16")
    p.add_argument("--channels_last", action="store_true",
                   help="also a fast fp32 variant with channels-last tensors")
    p.add_argument("--compile", action="store_true",
                   help="also a fast fp32 variant under torch.compile (compile time excluded)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds; each times every variant in turn, the median is reported")
    p.add_argument("--bank_images", type=int, default=32,
                   help="random images that fill memory banks (heads with a stage one)")
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    add_device_args(p)
    p.add_argument("--out", default="benchmark.json")
    p.add_argument("--opts", nargs="*", default=[])
    args = p.parse_args(argv)

    from dualmem.utils.config import load_config
    from dualmem.tools._common import apply_device_args

    device = apply_device_args(args)
    cfg = load_config(args.config, ["net.0.kwargs.pretrained=false"] + args.opts)
    torch.manual_seed(0)
    b = args.batch_size or cfg.dataset.get("batch_size", 8)
    h, w = cfg.dataset.input_size
    images = torch.randn(b, 3, h, w, device=device)
    fields = batch_fields(b, (h, w), device)
    specs = [("fast fp32", {})]
    if args.compare:
        specs = [("reference fp32", {"attn_impl": "reference", "cached": False})] + specs + \
                [("fast bf16", {"amp_dtype": torch.bfloat16})]
    if args.channels_last:
        specs.append(("fast fp32 channels-last", {"channels_last": True}))
    if args.compile:
        specs.append(("fast fp32 compiled", {"compile": True}))
    model = build(cfg, device, "sdpa")
    bank_s = prepare_banks(model, cfg, device, args.bank_images)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.trainable_parameters())
    del model
    variants = []
    for name, kw in specs:
        torch.manual_seed(0)
        v = Variant(name, cfg, state, images, fields, device, **kw)
        v.warm_up_s = call_timed(v.warm_up)[1]
        variants.append(v)
    peak_rounds = {dtype: [] for dtype in {v.amp_dtype or torch.float32 for v in variants}}
    # interleaved rounds: a load change on a shared machine hits every variant alike, and the
    # matmul reference is measured in every round too
    for r in range(args.rounds):
        for dtype in peak_rounds:
            peak_rounds[dtype].append(matmul_flops_per_s(device, dtype))
        for v in variants:
            v.time_train(args.steps)
            v.time_eval(args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v.name} {v.train_times[-1]:.2f} s/step" for v in variants), flush=True)
    peaks = {dtype: statistics.median(xs) for dtype, xs in peak_rounds.items()}
    results, maps = {}, {}
    for v in variants:
        dtype = v.amp_dtype or torch.float32
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem:
            v.time_train(1, record=False)
        flops = v.flops()
        train_s, eval_s = statistics.median(v.train_times), statistics.median(v.eval_times)
        fig = {"train_img_per_s": b / train_s, "eval_img_per_s": b / eval_s,
               "train_step_s": train_s, "train_step_s_rounds": v.train_times,
               "train_step_gflop": flops / 1e9, "achieved_gflop_per_s": flops / train_s / 1e9,
               "matmul_gflop_per_s": peaks[dtype] / 1e9,
               "matmul_gflop_per_s_rounds": [x / 1e9 for x in peak_rounds[dtype]],
               "fraction_of_matmul": flops / train_s / peaks[dtype],
               "peak_rss_mb": mem.peak / 2 ** 20, "warm_up_s": v.warm_up_s}
        if device.type == "cuda":
            fig["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        results[v.name] = fig
    # same weights, one eval pass each: do the paths compute the same maps?
    for v in variants:
        v.model.load_state_dict(state)
        v.model.eval()
        maps[v.name] = v.predict().float()
    base = maps[variants[0].name]
    first = variants[0].name
    for name in results:
        results[name]["max_abs_map_diff_vs_first"] = float((maps[name] - base).abs().max())
        results[name]["train_speedup_vs_first"] = (results[name]["train_img_per_s"] /
                                                   results[first]["train_img_per_s"])
    summary = {"config": str(args.config), "device": str(device),
               "threads": torch.get_num_threads(), "batch_size": b, "input_size": [h, w],
               "parameters": n_params, "trainable_parameters": n_train,
               "rounds": args.rounds, "steps_per_round": args.steps,
               "bank_build_s": bank_s, "variants": results}
    cols = ["train_img_per_s", "eval_img_per_s", "train_speedup_vs_first", "train_step_gflop",
            "achieved_gflop_per_s", "fraction_of_matmul", "peak_rss_mb",
            "max_abs_map_diff_vs_first"]
    table = [[name] + [f"{results[name][c]:.4g}" for c in cols] for name in results]
    print(f"\n{args.config}: batch {b}, {h}x{w}, {device}, {torch.get_num_threads()} threads, "
          f"{n_params / 1e6:.2f} M parameters ({n_train / 1e6:.2f} M trainable); median of "
          f"{args.rounds} interleaved rounds of {args.steps} steps"
          + (f"; memory banks built from {args.bank_images} random images in {bank_s:.1f} s"
             if bank_s is not None else ""))
    print(tabulate(table, headers=["path"] + cols, tablefmt="github"))
    write_json(args.out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
