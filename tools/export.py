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
recomputed from the map with ``dualmem.utils.metrics.image_score_from_map``), the per-class and
global thresholds and class names from the checkpoint, the DualMem version, a SHA-256 of the
checkpoint's config (canonical JSON) and the parity figures.
``dualmem.utils.exported_model.run_exported`` (also ``dualmem.utils.detector.run_exported``) runs the pair on image files.

Before anything is written, the exported file is run (ONNX Runtime / ``torch.jit.load``) on
real test images of the run's data (the test manifest of its config, up to ``--max_images``; or
``--images``) through the sidecar's preprocessing, and on random images, and compared with the
eager model in float32 fed by the checkpoint's own preprocessing (as ``tools/predict.py``). Any
map that differs by more than 1e-4 of its largest absolute value, any image score that differs
by more than 1e-4 of the largest score, or any change in the order of the image scores (pairs
closer than 1e-6 of the largest score count as ties) is refused: exit status 1, the worst
differences listed, nothing written. Exit 2: a problem with the arguments, checkpoint or data.

Default output: ``RUN/export/<checkpoint name>.onnx`` (``.pt`` for TorchScript). The work is
``dualmem.utils.exporting.export_checkpoint`` (graph, tracing, sidecar), checked by
``dualmem.utils.export_parity`` against ``dualmem.utils.detector.Detector`` (the one inference
path) in float32.
"""
import argparse
import sys

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

from dualmem.tools._common import add_device_args, add_trust_arg, apply_device_args  # noqa: E402
from dualmem.utils.exported_model import FORMATS, ExportError  # noqa: E402


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


def export(args):
    from dualmem.utils.exporting import export_checkpoint

    if apply_device_args(args).type != "cpu":
        raise ExportError("tools/export.py traces and checks the model on the CPU; drop "
                          "--device cuda (the exported file runs on any device)")
    result = export_checkpoint(args.work_dir or args.checkpoint, args.format, args.output,
                               args.images, args.max_images, trusted=args.trust_checkpoint,
                               plugins=args.plugins)
    if not result.written:
        print(f"error: {result.refusal()}", file=sys.stderr)
        return 1
    if result.tolerated:
        print(result.note(), file=sys.stderr)
    print(result.summary())
    return 0


def main(argv=None):
    """Exit status: 0 written, 1 refused (the parity check failed), 2 a problem with the
    arguments, checkpoint or data (one line; DUALMEM_DEBUG=1 shows the traceback)."""
    from dualmem.tools._common import run_main

    return run_main(export, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
