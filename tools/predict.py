"""Anomaly scores, heat maps and masks for unlabelled images, from a checkpoint alone.

    python tools/predict.py --checkpoint RUN --input FILE_OR_DIR --output OUT \
        [--class_name C] [--threshold X] [--pixel_threshold Y] [--device cpu]

``--checkpoint``: a run folder (its checkpoints/last.pth) or a checkpoint file.

The model is rebuilt from the config stored in the checkpoint (backbone ``pretrained`` forced
off: every weight comes from the checkpoint, nothing is downloaded) with the checkpoint's input
size, pixel mean/std and image-score rule, so a score equals the one ``--evaluate`` reports for
the same file. A folder is searched recursively for image files (by extension), leaving out
``--output`` when it lies inside (its overlays are no input).

Outputs under ``--output``: ``overlays/<rel>.png`` (heat map over the image, original size,
on the class's fixed colour scale with the threshold at the middle of the bar, marked, and a
heading: class, verdict, score, threshold), ``masks/<rel>.png`` (0/255, ``map >= pixel
threshold``), ``predictions.csv`` with columns file, class, score, normalized_score,
is_anomalous, threshold_from, image_threshold, pixel_threshold, overlay, mask, error, and
``index.html``: a gallery of the overlays (thumbnails embedded: it opens anywhere, without
network), sortable by score. ``normalized_score`` maps the decision threshold to 0.5
(``dualmem.utils.evaluator.normalized_score``). A missing ``--input``, or one without image files,
is refused before anything is written.

Which thresholds (stored in the checkpoint by the last evaluation during training):
  1. ``--threshold`` / ``--pixel_threshold`` always win (raw score / map units);
  2. the image's class: ``--class_name``, else the checkpoint's only class, else a folder name
     in the image's path (relative to ``--input``) equal to a class of the checkpoint
     (``<input>/bottle/x.png`` -> bottle);
  3. otherwise the 'global' thresholds: F1-optimal over all classes of the evaluation pooled
     (a unified model's per-class scores differ in scale, so pass --class_name when you can).
Unreadable files get a row with ``error`` filled in; the rest are processed and the exit status
is 1 when any file failed (2 for usage errors). Greyscale files follow training's rule: a class
all grey is expanded to three channels (a note says so), a grey file among colour ones is
refused by name. The work is ``dualmem.utils.prediction.predict_files``
on ``dualmem.utils.detector.load_detector`` (the Python API's one inference path).
"""
import argparse
import sys
from pathlib import Path

if not __package__:  # run as a script: `dualmem` is this checkout
    import _checkout  # noqa: F401

from dualmem.tools._common import add_device_args, add_trust_arg, apply_device_args  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (its checkpoints/last.pth) or a DualMem checkpoint file; "
                        "opened without running code from it")
    p.add_argument("--input", required=True, help="an image file or a folder (recursive)")
    p.add_argument("--output", required=True, help="folder for predictions.csv, overlays, masks")
    p.add_argument("--threshold", type=float, default=None,
                   help="image-score threshold (score >= X is anomalous); overrides the stored")
    p.add_argument("--pixel_threshold", type=float, default=None,
                   help="anomaly-map threshold for the masks; overrides the stored")
    p.add_argument("--class_name", default=None, help="class whose thresholds to use")
    p.add_argument("--normalize", default=None, choices=["global", "per_image"],
                   help="heat-map colouring: global = the class's fixed scale, threshold at "
                        "the middle (default: evaluator.vis.normalize, else global)")
    add_device_args(p)
    add_trust_arg(p)
    p.add_argument("--batch_size", type=int, default=None,
                   help="default: the config's test batch size")
    p.add_argument("--no_images", action="store_true",
                   help="write predictions.csv only (no overlays, masks or gallery)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def predict(args):
    from dualmem.utils.detector import load_detector
    from dualmem.utils.prediction import find_images, predict_files, summary

    find_images(args.input)  # a wrong --input is refused before the model is loaded
    detector = load_detector(args.checkpoint, device=apply_device_args(args),
                             trusted=args.trust_checkpoint, plugins=args.plugins)
    rows = predict_files(detector, args.input, args.output, args.class_name, args.threshold,
                         args.pixel_threshold, args.batch_size, args.normalize,
                         images=not args.no_images, progress=not args.no_progress)
    failed = [r for r in rows if r.get("error")]
    out = Path(args.output)
    print(f"{summary(rows)}; results in {out / 'predictions.csv'}" +
          ("" if args.no_images else f", gallery {out / 'index.html'}"))
    for r in failed:
        print(f"  failed: {r['file']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None):
    """Exit status: 0 every file scored, 1 some failed (rows with an error), 2 a problem with
    the arguments or the checkpoint (one line; DUALMEM_DEBUG=1 shows the traceback)."""
    from dualmem.tools._common import run_main

    return run_main(predict, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
