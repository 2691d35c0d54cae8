"""Export a trained model to one file (ONNX or TorchScript) with its sidecar, checked against the
eager model before anything is written (``tools/export.py`` is its command line).

The file maps a preprocessed batch ``image`` (N, 3, H, W) float32 to ``anomaly_map`` (N, H, W)
and ``score`` (N,): the image-score reduction (``evaluator.image_score``: max of an avg pool,
mean, std or top-k mean) is inside the graph (:class:`ExportGraph`). Memory banks (DMAD) are
buffers, so they are in the file. The batch size is free; H and W are the run's
``dataset.input_size``. The formats, how each is written and run, are the table
``dualmem.utils.exported_model.FORMATS``.

Beside it, ``F.json`` (the sidecar, :func:`build_sidecar`) holds what is needed around the
graph: preprocessing (input size, colour order, resize method, pixel mean/std), the image-score
rule (so a score can also be recomputed from the map with
``dualmem.utils.metrics.image_score_from_map``),
the per-class and global thresholds and class names from the checkpoint, the DualMem version, a
SHA-256 of the checkpoint's config (canonical JSON) and the parity figures
(``dualmem.utils.export_parity``: how the check works and what it refuses).
"""
import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualmem.utils.export_parity import MAP_RTOL, SCORE_RTOL
from dualmem.utils.exported_model import FORMATS, ONNX_OPSET, ExportError, sidecar_path  # noqa: F401
from dualmem.utils.inference import forward_maps

EXPORT_BATCH = 2    # traced with two images: the batch dimension stays free


# ----------------------------------------------------------------------------- graph
def image_score_graph(maps, reduction="max", kernel=16, topk=0.01):
    """``dualmem.utils.metrics.image_score_from_map`` in torch ops (float32), for the exported graph:
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
        maps = forward_maps(self.model, {"image": image}, None, image.device)  # float32
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
    """Trace ``graph`` on ``example`` and write it to ``path`` in ``fmt`` (``FORMATS``)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer / exporter notes about frozen Python values
        FORMATS[fmt][1](graph, example, path)


def default_output(checkpoint, fmt, work_dir=None):
    """``RUN/export/<checkpoint name><suffix>``."""
    ckpt = Path(checkpoint)
    run = Path(work_dir) if work_dir else (
        ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)
    return run / "export" / (ckpt.stem + FORMATS[fmt][0])


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
    """The sidecar's ``preprocessing`` entry (``dualmem.utils.detector.InputSpec.from_dict`` reads
    it)."""
    d = spec.to_dict()
    d["steps"] = (f"read ({spec.color_mode}) -> resize to input_size (h, w) by '{spec.resize}' "
                  f"-> float / 255 -> (x - pixel_mean) / pixel_std per channel -> CHW float32")
    return d


def build_sidecar(fmt, output, checkpoint, cfg, state, spec, score_cfg, parity):
    from dualmem.utils.code_state import code_version
    from dualmem.utils.inference import describe, settings_of

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
                        "from_map": "dualmem.utils.metrics.image_score_from_map(anomaly_map, "
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


# ----------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """What :func:`export_checkpoint` did: written unless ``problems`` (the parity check's
    failures, worst first) is non-empty; ``tolerated``: differences allowed as k-NN ties."""
    fmt: str
    output: Path
    sidecar: Path
    parity: dict
    problems: list
    tolerated: list

    @property
    def written(self):
        return not self.problems

    def refusal(self):
        return (f"the exported {self.fmt} model does not reproduce the eager model (limits: "
                f"maps {MAP_RTOL:g} of their max, scores {SCORE_RTOL:g} of the max, no change "
                f"in score order); nothing written. Worst differences:\n"
                + "\n".join(self.problems))

    def note(self):
        return ("note: over the limits only where the eager model itself moves as much when "
                "its input moves by float32 rounding (k-NN ties):\n" + "\n".join(self.tolerated))

    def summary(self):
        t, r = self.parity["test images"], self.parity["random images"]
        return (f"wrote {self.output} and {self.sidecar.name} ({self.fmt}"
                f"{f', opset {ONNX_OPSET}' if self.fmt == 'onnx' else ''}); checked on "
                f"{t['images']} test and {r['images']} random images: max map difference "
                f"{max(t['max_map_diff_rel'], r['max_map_diff_rel']):.2e} of the map's max, "
                f"max score difference "
                f"{max(t['max_score_diff_rel'], r['max_score_diff_rel']):.2e}, score order "
                f"unchanged{'' if not self.tolerated else ' (outside k-NN ties, see note)'}")


def _atomic_copy(src, dest):
    partial = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, partial)
    os.replace(partial, dest)


def export_checkpoint(run_or_checkpoint, fmt, output=None, images=None, max_images=32,
                      trusted=False, plugins=()):
    """Export a run folder's ``checkpoints/last.pth`` (or a checkpoint file) to ``output``
    (default :func:`default_output`) in ``fmt``, on the CPU. The file is checked first
    (``dualmem.utils.export_parity``, on ``images`` or up to ``max_images`` of the run's test set);
    file and sidecar are written (atomically) only when it passes."""
    from dualmem.utils.detector import as_batch, load_model, resolve_checkpoint
    from dualmem.utils.export_parity import (check_exported, check_images, eager_outputs,
                                     eager_reference, parity_record, random_images)
    from dualmem.utils.exported_model import ExportedModel

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    checkpoint = resolve_checkpoint(run_or_checkpoint)
    work_dir = run_or_checkpoint if Path(run_or_checkpoint).is_dir() else None
    output = Path(output) if output else default_output(checkpoint, fmt, work_dir)
    model, cfg, state = load_model(checkpoint, torch.device("cpu"), trusted=trusted,
                                   plugins=plugins)
    reference = eager_reference(model, cfg, state)  # the Detector as the graph computes
    spec, score_cfg = reference.spec, reference.score_cfg
    files = check_images(cfg, state, images, max_images)
    paths = [p for p, _ in files]
    noise = random_images(spec)
    eager = {"test images": eager_outputs(reference, paths),
             "random images": eager_outputs(reference, noise)}

    example = as_batch(paths[:EXPORT_BATCH], spec)[0]
    if len(example) < EXPORT_BATCH:
        example = as_batch(noise[:EXPORT_BATCH], spec)[0]
    side = sidecar_path(output)
    with tempfile.TemporaryDirectory(prefix="dualmem-export-") as tmp:
        tmp_file = Path(tmp) / ("model" + FORMATS[fmt][0])
        write_exported(ExportGraph(exportable_copy(model), score_cfg), example, fmt, tmp_file)
        meta = build_sidecar(fmt, output, checkpoint, cfg, state, spec, score_cfg, None)
        results = check_exported(reference, ExportedModel(tmp_file, meta), files, noise, eager)
        problems = [f"  {what}: {line}" for what, res in results.items()
                    for line in res["fail"][:8]]
        tolerated = [f"  {what}: {line}" for what, res in results.items()
                     for line in res["tolerated"][:8]]
        result = ExportResult(fmt, output, side, None, problems, tolerated)
        if problems:
            return result
        meta["parity"] = result.parity = parity_record(results)
        output.parent.mkdir(parents=True, exist_ok=True)
        _atomic_copy(tmp_file, output)
    partial = side.with_name(f".{side.name}.tmp")
    partial.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(partial, side)
    return result
