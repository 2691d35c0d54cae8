"""Export a trained model to one file (ONNX or TorchScript), checked against the eager model.

    python tools/export.py --work_dir RUN --format onnx [--output F]
    python tools/export.py --checkpoint RUN/checkpoints/last.pth --format torchscript

The file maps a preprocessed batch ``image`` (N, 3, H, W) float32 to ``anomaly_map`` (N, H, W)
and ``score`` (N,): the image-score reduction (``evaluator.image_score``: max of an avg pool,
mean, std or top-k mean) is inside the graph. Memory banks (DMAD) are buffers, so they are in
the file. The batch size is free; H and W are the run's ``dataset.input_size``. ONNX uses opset
``ONNX_OPSET`` (the TorchScript-based exporter); TorchScript is ``torch.jit.trace`` on CPU.

Beside it, ``F.json`` (the sidecar) holds what is needed around the graph: preprocessing (input
size, colour order, resize method, pixel mean/std), the image-score rule (so a score can also be
recomputed from the map with ``utils.metrics.image_score_from_map``), the per-class and global
thresholds and class names from the checkpoint, the DualMem version, a SHA-256 of the
checkpoint's config (canonical JSON) and the parity figures. ``utils.detector.run_exported``
runs the pair on image files.

Before anything is written, the exported file is run (ONNX Runtime / ``torch.jit.load``) on
real test images of the run's data (the test manifest of its config, up to ``--max_images``; or
``--images``) through the sidecar's preprocessing, and on random images, and compared with the
eager model fed by the checkpoint's own preprocessing (as ``tools/predict.py``). Any map that
differs by more than 1e-4 of its largest absolute value, any image score that differs by more
than 1e-4 of the largest score, or any change in the order of the image scores (pairs closer
than 1e-6 of the largest score count as ties) is refused: exit status 1, the worst differences
listed, nothing written. Exit 2: a problem with the arguments, checkpoint or data.

Default output: ``RUN/export/<checkpoint name>.onnx`` (``.pt`` for TorchScript).
"""
import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tools._common import add_device_args, add_trust_arg, apply_device_args  # noqa: E402
from utils.errors import UserError  # noqa: E402

ONNX_OPSET = 17
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
MAP_RTOL = 1e-4     # of each map's largest absolute value
SCORE_RTOL = 1e-4   # of the largest absolute image score of the set
TIE_RTOL = 1e-6     # scores closer than this (of the largest) are ties: their order is free
EXPORT_BATCH = 2    # traced with two images: the batch dimension stays free
NUM_RANDOM = 4
NOISE_EPS = 1e-6  # input perturbation that measures the eager model's own reproducibility


class ExportError(UserError):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--work_dir", help="a run folder: its checkpoints/last.pth is exported")
    src.add_argument("--checkpoint", help="a checkpoint file (opened without running code)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--output", default=None,
                   help="the exported file (default: RUN/export/<checkpoint>.onnx|.pt); the "
                        "sidecar is <output>.json")
    p.add_argument("--images", default=None,
                   help="check on these images (a file or folder) instead of the run's test set")
    p.add_argument("--max_images", type=int, default=32,
                   help="test images compared (evenly spread over the test manifest)")
    add_device_args(p)  # --threads: torch and ONNX Runtime; the export itself runs on the CPU
    add_trust_arg(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the graph
def image_score_graph(maps, reduction="max", kernel=16, topk=0.01):
    """``utils.metrics.image_score_from_map`` in torch ops (float32), for the exported graph:
    (N, H, W) -> (N,)."""
    h, w = (int(s) for s in maps.shape[-2:])
    if reduction == "max":
        k = int(min(kernel, h, w))
        pooled = F.avg_pool2d(maps.unsqueeze(1), k, stride=1) if k > 1 else maps.unsqueeze(1)
        return pooled.amax(dim=(1, 2, 3))
    if reduction == "mean":
        return maps.mean(dim=(1, 2))
    if reduction == "std":
        centred = maps - maps.mean(dim=(1, 2), keepdim=True)
        return centred.pow(2).mean(dim=(1, 2)).sqrt()
    if reduction == "topk":
        n = max(1, int(math.ceil(topk * h * w - 1e-9)))
        return maps.flatten(1).topk(n, dim=1).values.mean(dim=1)
    raise ExportError(f"unknown image-score reduction {reduction!r}")


class ExportGraph(nn.Module):
    """image (N, 3, H, W) -> (anomaly_map (N, H, W), score (N,)) in float32."""

    def __init__(self, model, score_cfg):
        super().__init__()
        self.model = model
        self.score_cfg = {k: score_cfg[k] for k in ("reduction", "kernel", "topk")
                          if k in score_cfg}

    def forward(self, image):
        maps = self.model({"image": image})["pred"][:, 0].float()
        return maps, image_score_graph(maps, **self.score_cfg)


def exportable_copy(model):
    """The eval-mode model with retrieval over all query rows in one block (DMAD's
    ``query_chunk``): a traced loop over query chunks would fix the number of chunks, and so
    the batch size. Bank chunks (the bank's size is fixed) are kept."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(getattr(module, "query_chunk", None), int):
            module.query_chunk = 1 << 40
        cls = type(module)
        if cls.get_extra_state is not nn.Module.get_extra_state:
            # plain-data extra state (DMAD's class names) is no tensor of the graph, and the
            # ONNX exporter reads every state_dict value as one: this copy does without it
            module.__class__ = type(cls.__name__, (cls,),
                                    {"get_extra_state": nn.Module.get_extra_state})
    return model


def write_exported(graph, example, fmt, path):
    """Trace ``graph`` on ``example`` and write it to ``path`` in ``fmt``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer / exporter notes about frozen Python values
        if fmt == "torchscript":
            traced = torch.jit.trace(graph, (example,), check_trace=False)
            torch.jit.save(traced, str(path))
            return
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["anomaly_map", "score"],
                          dynamic_axes={"image": {0: "batch"}, "anomaly_map": {0: "batch"},
                                        "score": {0: "batch"}},
                          do_constant_folding=True)


# ----------------------------------------------------------------------------- check inputs
def default_output(checkpoint, fmt, work_dir=None):
    ckpt = Path(checkpoint)
    run = Path(work_dir) if work_dir else (
        ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)
    return run / "export" / (ckpt.stem + FORMATS[fmt])


def spread(items, n):
    """``n`` items evenly spread over ``items`` (all of them when there are fewer)."""
    if n <= 0 or len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, n).round().astype(int)))]


def test_images(cfg, state, images=None, max_images=32):
    """(path, name) pairs: ``images`` (a file or folder), else the run's test manifest."""
    if images:
        from tools.predict import find_images

        found = find_images(images)
        if not found:
            raise ExportError(f"no image files under {images}")
        return [(str(p), rel) for p, rel in spread(found, max_images)]
    from datasets.builder import build_datasets

    classes = list(state.get("classes") or [])
    try:
        _, test_set, _ = build_datasets(cfg, state["pixel_mean"], state["pixel_std"],
                                        class_name=classes[0] if len(classes) == 1 else None)
    except (UserError, FileNotFoundError) as exc:
        raise ExportError(f"the run's test images are not available here ({exc}); pass "
                          f"--images FOLDER to check the export on other real images") from None
    records = spread(test_set.records, max_images)
    return [(test_set.path_of(r["filename"]), r["filename"]) for r in records]


def random_images(spec, n=NUM_RANDOM, seed=0):
    """uint8 images of another size than the input (the resize is part of what is checked)."""
    rng = np.random.default_rng(seed)
    h, w = spec.input_size
    shape = (h + h // 2 + 3, w + w // 3 + 5) + (() if spec.color_mode == "GRAY" else (3,))
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


@torch.no_grad()
def eager_outputs(model, spec, score_cfg, items, batch_size=4):
    """The eager model on the checkpoint's own preprocessing, float32: (maps, scores)."""
    from utils.detector import as_batch
    from utils.metrics import image_score_from_map

    maps = []
    for i in range(0, len(items), batch_size):
        x = as_batch(items[i:i + batch_size], spec)[0]
        maps.append(model({"image": x})["pred"][:, 0].float().numpy())
    maps = np.concatenate(maps)
    return maps, image_score_from_map(maps, **score_cfg)


# ----------------------------------------------------------------------------- comparison
def compare(names, eager_maps, eager_scores, maps, scores, noise=None):
    """The exported outputs against the eager ones: {'fail': [...], 'tolerated': [...]}
    (report lines, worst first), 'suspects' (indices of the images behind them), the largest
    relative map and score differences and the number of changes in score order.

    ``noise`` = (map change relative to the map's max, absolute score change) per image: how
    far the eager model itself moves when its input moves by float32 rounding (see
    :func:`eager_noise`). A difference within twice that is an input sitting on a k-NN tie
    (DMAD's retrieval picks among nearly equidistant memories), where no float32 evaluation,
    eager or exported, is reproducible: it is reported as tolerated, not as a failure."""
    e_maps, x_maps = np.asarray(eager_maps, np.float64), np.asarray(maps, np.float64)
    if e_maps.shape != x_maps.shape:
        return {"fail": [f"output shape: eager maps {e_maps.shape}, exported {x_maps.shape}"],
                "tolerated": [], "suspects": [], "max_map_diff_rel": None,
                "max_score_diff_rel": None, "rank_changes": None, "images": len(names)}
    n = len(names)
    map_noise, score_noise = (np.zeros(n), np.zeros(n)) if noise is None else noise
    e_s, x_s = np.asarray(eager_scores, np.float64), np.asarray(scores, np.float64)
    scale_m = np.maximum(np.abs(e_maps).reshape(n, -1).max(1), 1e-12)
    map_rel = np.abs(e_maps - x_maps).reshape(n, -1).max(1) / scale_m
    scale_s = max(float(np.abs(e_s).max()), 1e-12)
    score_rel = np.abs(e_s - x_s) / scale_s
    found = []  # (severity, tolerated, line, indices)
    for i in np.flatnonzero(map_rel > MAP_RTOL):
        found.append((map_rel[i] / MAP_RTOL, map_rel[i] <= 2 * map_noise[i],
                      f"map   {map_rel[i]:.3e} of its max  {names[i]}"
                      f"{f' (eager itself: {map_noise[i]:.1e})' if map_noise[i] else ''}", [i]))
    for i in np.flatnonzero(score_rel > SCORE_RTOL):
        found.append((score_rel[i] / SCORE_RTOL, abs(e_s[i] - x_s[i]) <= 2 * score_noise[i],
                      f"score {score_rel[i]:.3e} of the max  {names[i]} (eager {e_s[i]:.7g}, "
                      f"exported {x_s[i]:.7g})", [i]))
    tie = TIE_RTOL * scale_s
    rank = 0
    for i in range(n):
        for j in range(n):
            gap = e_s[j] - e_s[i]
            if gap > tie and x_s[i] > x_s[j]:
                rank += 1
                found.append((gap / tie, gap <= 2 * (score_noise[i] + score_noise[j]),
                              f"rank  {names[i]} scored below {names[j]} by the eager model "
                              f"(by {gap:.3g}), above it exported", [i, j]))
    found.sort(key=lambda f: -f[0])
    return {"fail": [f[2] for f in found if not f[1]],
            "tolerated": [f[2] for f in found if f[1]],
            "suspects": sorted({i for f in found if not f[1] for i in f[3]}),
            "max_map_diff_rel": float(map_rel.max()) if n else None,
            "max_score_diff_rel": float(score_rel.max()) if n else None,
            "rank_changes": rank, "images": n}


@torch.no_grad()
def eager_noise(model, spec, score_cfg, items, eager_maps, eager_scores, indices, trials=3,
                eps=NOISE_EPS, seed=0):
    """(map change relative to the map's max, absolute score change) of the eager model when
    each preprocessed input moves by N(0, eps^2) (a few float32 rounding steps), the largest of
    ``trials``; zero outside ``indices``."""
    from utils.detector import as_batch
    from utils.metrics import image_score_from_map

    map_noise, score_noise = np.zeros(len(items)), np.zeros(len(items))
    g = torch.Generator().manual_seed(seed)
    for i in indices:
        x = as_batch([items[i]], spec)[0]
        scale = max(float(np.abs(eager_maps[i]).max()), 1e-12)
        for _ in range(trials):
            m = model({"image": x + eps * torch.randn(x.shape, generator=g)})["pred"][:, 0]
            m = m.float().numpy()
            map_noise[i] = max(map_noise[i], float(np.abs(m[0] - eager_maps[i]).max()) / scale)
            score_noise[i] = max(score_noise[i], abs(float(image_score_from_map(
                m, **score_cfg)[0]) - float(eager_scores[i])))
    return map_noise, score_noise


# ----------------------------------------------------------------------------- sidecar
def jsonable(obj):
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def config_sha256(config):
    """SHA-256 of the config's canonical JSON (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(jsonable(config), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sidecar_preprocessing(spec):
    """The sidecar's ``preprocessing`` entry (``utils.detector.InputSpec.from_dict`` reads it)."""
    d = spec.to_dict()
    d["steps"] = (f"read ({spec.color_mode}) -> resize to input_size (h, w) by '{spec.resize}' "
                  f"-> float / 255 -> (x - pixel_mean) / pixel_std per channel -> CHW float32")
    return d


def build_sidecar(fmt, output, checkpoint, cfg, state, spec, score_cfg, parity):
    from utils.code_state import code_version
    from utils.inference import describe, settings_of

    h, w = spec.input_size
    meta = {
        "format": fmt,
        "file": Path(output).name,
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
        "inputs": {"image": {"shape": ["N", 3, h, w], "dtype": "float32",
                             "what": "a batch preprocessed as 'preprocessing' says"}},
        "outputs": {"anomaly_map": {"shape": ["N", h, w], "dtype": "float32"},
                    "score": {"shape": ["N"], "dtype": "float32",
                              "what": "image score, 'image_score' reduction in the graph"}},
        "preprocessing": sidecar_preprocessing(spec),
        "image_score": {**{k: score_cfg.get(k) for k in ("reduction", "kernel", "topk")},
                        "in_graph": True,
                        "from_map": "utils.metrics.image_score_from_map(anomaly_map, "
                                    "reduction, kernel, topk)"},
        "thresholds": jsonable(state.get("thresholds")),
        # the graph computes in float32; the thresholds come from an evaluation that ran as
        # 'evaluated' says (bf16/fp16 autocast or a float16 feature cache differ slightly)
        "precision": {"graph": "float32", "evaluated": describe(settings_of(state, cfg))},
        "classes": list(state.get("classes") or []),
        "methods": [e.get("type") for e in cfg["net"]],
        "checkpoint": str(checkpoint),
        "epoch": state.get("epoch"),
        "dualmem_version": code_version(),
        "config_sha256": config_sha256(state["config"]),
        "torch_version": torch.__version__,
        "parity": parity,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if fmt == "onnx":
        import onnx
        import onnxruntime

        meta["onnx_version"], meta["onnxruntime_version"] = onnx.__version__, \
            onnxruntime.__version__
    return meta


# ----------------------------------------------------------------------------- main
def export(args):
    from utils.detector import ExportedModel, InputSpec, load_model, resolve_checkpoint, \
        run_exported, sidecar_path
    from utils.evaluator import evaluator_settings

    if apply_device_args(args).type != "cpu":
        raise ExportError("tools/export.py traces and checks the model on the CPU; drop "
                          "--device cuda (the exported file runs on any device)")
    checkpoint = resolve_checkpoint(args.work_dir or args.checkpoint)
    output = Path(args.output) if args.output else \
        default_output(checkpoint, args.format, args.work_dir)
    model, cfg, state = load_model(checkpoint, torch.device("cpu"),
                                   trusted=args.trust_checkpoint)
    spec = InputSpec.from_checkpoint(cfg, state)
    score_cfg = dict(evaluator_settings(cfg)[1])
    files = test_images(cfg, state, args.images, args.max_images)
    paths, names = [p for p, _ in files], [n for _, n in files]
    noise = random_images(spec)
    noise_names = [f"<random {i}>" for i in range(len(noise))]

    eager_maps, eager_scores = eager_outputs(model, spec, score_cfg, paths)
    noise_maps, noise_scores = eager_outputs(model, spec, score_cfg, noise)

    from utils.detector import as_batch

    example = as_batch(paths[:EXPORT_BATCH], spec)[0]
    if len(example) < EXPORT_BATCH:
        example = as_batch(noise[:EXPORT_BATCH], spec)[0]
    with tempfile.TemporaryDirectory(prefix="dualmem-export-") as tmp:
        tmp_file = Path(tmp) / ("model" + FORMATS[args.format])
        write_exported(ExportGraph(exportable_copy(model), score_cfg), example, args.format,
                       tmp_file)
        meta = build_sidecar(args.format, output, checkpoint, cfg, state, spec, score_cfg, None)
        exported = ExportedModel(tmp_file, meta)
        # the exported pair as it will be used: files through the sidecar's preprocessing,
        # in batches of 3 (not the traced 2), and single random images
        maps, scores = run_exported(exported, paths, batch_size=3)
        r_maps, r_scores = zip(*(run_exported(exported, [img]) for img in noise))
        sets = {"test images": (paths, names, eager_maps, eager_scores, maps, scores),
                "random images": (noise, noise_names, noise_maps, noise_scores,
                                  np.concatenate(r_maps), np.concatenate(r_scores))}
        results = {}
        for what, (items, labels, e_maps, e_scores, x_maps, x_scores) in sets.items():
            res = compare(labels, e_maps, e_scores, x_maps, x_scores)
            if res["suspects"] and res["rank_changes"] is not None:
                # is the eager model itself that sensitive there (a k-NN tie)?
                res = compare(labels, e_maps, e_scores, x_maps, x_scores,
                              eager_noise(model, spec, score_cfg, items, e_maps, e_scores,
                                          res["suspects"]))
            results[what] = res
        problems = [f"  {what}: {line}" for what, res in results.items()
                    for line in res["fail"][:8]]
        tolerated = [f"  {what}: {line}" for what, res in results.items()
                     for line in res["tolerated"][:8]]
        if problems:
            print(f"error: the exported {args.format} model does not reproduce the eager model "
                  f"(limits: maps {MAP_RTOL:g} of their max, scores {SCORE_RTOL:g} of the "
                  f"max, no change in score order); nothing written. Worst differences:\n"
                  + "\n".join(problems), file=sys.stderr)
            return 1
        if tolerated:
            print("note: over the limits only where the eager model itself moves as much when "
                  "its input moves by float32 rounding (k-NN ties):\n" + "\n".join(tolerated),
                  file=sys.stderr)
        parity = {what: {k: res[k] for k in ("images", "max_map_diff_rel",
                                              "max_score_diff_rel", "rank_changes")}
                  for what, res in results.items()}
        for what, res in results.items():
            parity[what]["tolerated_ties"] = res["tolerated"]
        parity["limits"] = {"map_rel": MAP_RTOL, "score_rel": SCORE_RTOL, "tie_rel": TIE_RTOL,
                            "eager_noise_input_eps": NOISE_EPS}
        meta["parity"] = parity
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(f".{output.name}.tmp")
        shutil.copyfile(tmp_file, partial)
        os.replace(partial, output)
    side = sidecar_path(output)
    partial = side.with_name(f".{side.name}.tmp")
    partial.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(partial, side)
    t, r = parity["test images"], parity["random images"]
    print(f"wrote {output} and {side.name} ({args.format}"
          f"{f', opset {ONNX_OPSET}' if args.format == 'onnx' else ''}); checked on "
          f"{t['images']} test and {r['images']} random images: max map difference "
          f"{max(t['max_map_diff_rel'], r['max_map_diff_rel']):.2e} of the map's max, max "
          f"score difference {max(t['max_score_diff_rel'], r['max_score_diff_rel']):.2e}, "
          f"score order unchanged{'' if not tolerated else ' (outside k-NN ties, see note)'}")
    return 0


def main(argv=None):
    """Exit status: 0 written, 1 refused (the parity check failed), 2 a problem with the
    arguments, checkpoint or data (one line; DUALMEM_DEBUG=1 shows the traceback)."""
    from tools._common import run_main

    return run_main(export, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
