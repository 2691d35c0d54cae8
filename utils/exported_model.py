"""An exported model (``tools/export.py``) and its sidecar, run without DualMem's model code.

The formats are one table, :data:`FORMATS` ``{format: (suffix, write, load)}``:
``write(graph, example, path)`` traces a graph into the file (``utils.exporting``), and
``load(path)`` gives a function from a float32 (N, 3, H, W) CPU tensor to (maps (N, H, W),
scores (N,)) numpy arrays (:class:`ExportedModel`). A format is added here and nowhere else.

``ExportedModel``, ``run_exported`` and ``sidecar_path`` are also importable from
``utils.detector``, where they lived before.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch

from dualmem.utils.errors import UserError

ONNX_OPSET = 17
SIDECAR_SUFFIX = ".json"


class ExportError(UserError):
    """A model that cannot be exported, or an exported file that cannot be run."""


def sidecar_path(path):
    """``model.onnx`` -> ``model.onnx.json``: what is needed around the exported graph."""
    return Path(str(path) + SIDECAR_SUFFIX)


# ----------------------------------------------------------------------------- formats
def write_onnx(graph, example, path):
    """ONNX opset ``ONNX_OPSET`` by the TorchScript-based exporter, the batch dimension free."""
    torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                      input_names=["image"], output_names=["anomaly_map", "score"],
                      dynamic_axes={"image": {0: "batch"}, "anomaly_map": {0: "batch"},
                                    "score": {0: "batch"}},
                      do_constant_folding=True)


def write_torchscript(graph, example, path):
    """``torch.jit.trace`` on ``example`` (CPU), saved with ``torch.jit.save``."""
    traced = torch.jit.trace(graph, (example,), check_trace=False)
    torch.jit.save(traced, str(path))


def load_onnx(path):
    """ONNX Runtime on the CPU, torch's thread count, errors only on stderr."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no shape-inference notes on stderr
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x):
        maps, scores = session.run(["anomaly_map", "score"], {"image": x.numpy()})
        return maps, scores
    return run


def load_torchscript(path):
    """``torch.jit.load`` on the CPU, run without autograd."""
    import warnings

    with warnings.catch_warnings():  # torch >= 2.10 calls TorchScript deprecated
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x):
        with torch.no_grad():
            maps, scores = module(x)
        return maps.numpy(), scores.numpy()
    return run


FORMATS = {"onnx": (".onnx", write_onnx, load_onnx),
           "torchscript": (".pt", write_torchscript, load_torchscript)}


# ----------------------------------------------------------------------------- running
class ExportedModel:
    """An exported file (any of :data:`FORMATS`) with its sidecar: (N, 3, H, W) float32 ->
    (maps (N, H, W), image scores (N,))."""

    def __init__(self, path, meta=None):
        from dualmem.utils.detector import InputSpec

        self.path = Path(path)
        if meta is None:
            side = sidecar_path(self.path)
            if not side.is_file():
                raise FileNotFoundError(f"{side} not found: the sidecar written by "
                                        f"tools/export.py beside {self.path}")
            meta = json.loads(side.read_text(encoding="utf-8"))
        self.meta = meta
        self.spec = InputSpec.from_dict(meta["preprocessing"])
        self.format = meta["format"]
        if self.format not in FORMATS:
            raise ExportError(f"{self.path}: unknown exported format {self.format!r} (known: "
                              f"{', '.join(FORMATS)})")
        self._run = FORMATS[self.format][2](self.path)

    def __call__(self, batch):
        x = batch.detach().float().cpu().contiguous() if torch.is_tensor(batch) else \
            torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        return self._run(x)


def run_exported(path, images, batch_size=8):
    """Run an exported model on image files / arrays (preprocessed by
    ``utils.detector.preprocess`` with the sidecar's size, resize method and normalisation) or
    on a preprocessed batch: (maps (N, H, W) at the input size, scores (N,)) as numpy arrays."""
    from dualmem.utils.detector import as_batch, is_image_array

    model = path if isinstance(path, ExportedModel) else ExportedModel(path)
    if torch.is_tensor(images) or isinstance(images, np.ndarray) and images.ndim == 4:
        batches = [images]
    else:
        items = [images] if isinstance(images, (str, os.PathLike)) or \
            is_image_array(images) else list(images)
        batches = [as_batch(items[i:i + batch_size], model.spec)[0]
                   for i in range(0, len(items), batch_size)]
    maps, scores = zip(*(model(b) for b in batches))
    return np.concatenate(maps), np.concatenate(scores)
