"""Pictures of an evaluation: per-image panels and heat-map overlays (OpenCV), ROC plots.

Panel layout (RGB, one row): ``image | ground truth | heat-map overlay | thresholded map``
under a caption strip, each tile at the model's input size, tiles separated by ``GAP`` white
columns, then the heat map's colour bar (ticks, a title, the threshold marked); ``panel_for``
adds a heading strip above with the score, the image threshold, the verdict and the label
(wrapped, never clipped). Heat maps are coloured with OpenCV's JET map on one of two scales:
'global' (default), the class's fixed scale from its calibration (``drawing.calibrated_range``:
the threshold at the middle of the bar, the smallest map value of the evaluation at the
bottom), so colours mean the same score in every image of the class; or 'per_image', each
image's own min/max (shows structure in normal images, but not comparable). The thresholded
tile shows ``map >= pixel threshold`` in white with the ground-truth outline in green; a class
without masks (results protocol ``no_masks``, or no pixel threshold) says "no mask" and draws
no thresholded map.
"""
from pathlib import Path

import numpy as np

from dualmem.datasets.image_io import LEGACY_RESIZE, read_image, resize_image
from dualmem.utils.metrics import ranking_curves
from dualmem.utils.errors import UserError
from dualmem.utils.drawing import (COLORBAR_W, GAP, HEADER, normalize_map, colorize, overlay, text_strip, colorbar, colorbar_width, panel_shape, verdict_text, annotated_overlay, render_panel, stack_rows, write_png, calibrated_range)  # noqa: F401 (re-exported)

VIS_DEFAULTS = {"normalize": "global", "max_images": None, "alpha": 0.5,
                "tensorboard_panels": 8}
# distinguishable line colours (RGB), cycled for more classes
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def vis_settings(cfg):
    """``evaluator.vis`` with defaults filled in; errors name the key."""
    out = dict(VIS_DEFAULTS)
    out.update({k: v for k, v in dict((cfg.get("evaluator") or {}).get("vis") or {}).items()})
    if out["normalize"] not in ("global", "per_image"):
        raise UserError(f"evaluator.vis.normalize must be 'global' or 'per_image', got "
                         f"{out['normalize']!r}")
    if out["max_images"] is not None and int(out["max_images"]) < 1:
        raise UserError(f"evaluator.vis.max_images must be >= 1 or null, got "
                         f"{out['max_images']}")
    if not 0.0 <= float(out["alpha"]) <= 1.0:
        raise UserError(f"evaluator.vis.alpha must be in [0, 1], got {out['alpha']}")
    return out


# ----------------------------------------------------------------------------- an evaluation
def defect_name(filename):
    """MVTec layout ``<cls>/test/<defect>/<name>``: the image's parent folder name."""
    return Path(filename).parent.name or "unknown"


def display_image(dataset, index):
    """The test image as the model saw it (input size), in RGB for display."""
    rec = dataset.records[index]
    return resize_image(read_image(dataset.path_of(rec["filename"]), "RGB"), dataset.input_size,
                        getattr(dataset, "resize", LEGACY_RESIZE))


def color_scale(thresholds, cls, normalize="global"):
    """(lo, hi, marked threshold) of a class's heat maps: its calibrated fixed scale
    ('global'), or None, None and the threshold for 'per_image'."""
    entry = ((thresholds or {}).get("per_class") or {}).get(cls) or {}
    reduction = ((thresholds or {}).get("image_score") or {}).get("reduction", "max")
    lo, hi, mark = calibrated_range(entry, entry.get("image_threshold"),
                                    entry.get("pixel_threshold"), reduction)
    return (lo, hi, mark) if normalize == "global" else (None, None, mark)


def has_no_mask(thresholds, cls, no_masks=()):
    """Whether a class's panels say "no mask": it is listed in the results protocol's
    ``no_masks``, or its thresholds entry holds no pixel threshold (an evaluation without
    masks stores none)."""
    entry = ((thresholds or {}).get("per_class") or {}).get(cls) or {}
    return cls in (no_masks or ()) or ("pixel_threshold" in entry and
                                         entry["pixel_threshold"] is None)


def panel_for(inf, i, dataset, thresholds, normalize="global", alpha=0.5, no_masks=()):
    cls = inf["clsname"][i]
    lo, hi, mark = color_scale(thresholds, cls, normalize)
    entry = ((thresholds or {}).get("per_class") or {}).get(cls) or {}
    title = f"{defect_name(inf['filename'][i])} {float(inf['score'][i]):.3g}"
    text, color = verdict_text(inf["score"][i], entry.get("image_threshold"),
                               inf["label"][i])
    heading = (text, color)  # the defect and score are in the first tile's caption
    no_mask = has_no_mask(thresholds, cls, no_masks)  # then no map thresholded against blanks
    return render_panel(display_image(dataset, int(inf["index"][i])), inf["masks"][i],
                        inf["maps"][i].astype(np.float32), lo, hi,
                        None if no_mask else entry.get("pixel_threshold"), alpha, title=title,
                        heading=heading, resize=getattr(dataset, "resize", LEGACY_RESIZE),
                        mark=mark, no_mask=no_mask)


def select_for_vis(inf, max_images=None):
    """Indices to draw: all, or per class at most ``max_images`` taken round-robin over the
    defect folders (so every defect type is shown before any gets a second image)."""
    order = []
    clsnames = np.asarray(inf["clsname"])
    for cls in dict.fromkeys(inf["clsname"]):
        idx = np.flatnonzero(clsnames == cls)
        if max_images is None or len(idx) <= max_images:
            order += idx.tolist()
            continue
        by_defect = {}
        for i in idx:
            by_defect.setdefault(defect_name(inf["filename"][i]), []).append(int(i))
        ranked = sorted((rank, d, i) for d, items in by_defect.items()
                        for rank, i in enumerate(items))
        order += sorted(i for _, _, i in ranked[:max_images])
    return order


def write_panels(inf, dataset, thresholds, out_dir, normalize="global", max_images=None,
                 alpha=0.5, no_masks=()):
    """Panels as ``<out_dir>/<class>/<defect>/<image stem>.png``; returns the paths."""
    paths = []
    for i in select_for_vis(inf, max_images):
        name = Path(inf["filename"][i])
        path = Path(out_dir) / inf["clsname"][i] / defect_name(name) / (name.stem + ".png")
        paths.append(write_png(path, panel_for(inf, i, dataset, thresholds, normalize, alpha,
                                                 no_masks)))
    return paths


def summary_indices(inf, limit=8):
    """For the TensorBoard grid: per class the top-scoring anomalous image (the clearest hit)
    and the top-scoring normal one (the likeliest false alarm), up to ``limit`` panels."""
    chosen = []
    clsnames, labels, scores = np.asarray(inf["clsname"]), inf["label"], inf["score"]
    for cls in dict.fromkeys(inf["clsname"]):
        for want in (1, 0):
            idx = np.flatnonzero((clsnames == cls) & ((labels > 0) == bool(want)))
            if idx.size and len(chosen) < limit:
                chosen.append(int(idx[np.argmax(scores[idx])]))
    return chosen


# ----------------------------------------------------------------------------- ROC plots
def roc_points(scores, labels):
    """Exact ROC polyline (fpr, tpr) of ``score >= t`` over all thresholds, ties as one step,
    from the same curve as ``metrics`` (so its area is the reported AUROC); None if one class."""
    curves = ranking_curves(scores, labels)
    return None if curves is None else curves["roc"]


def roc_figure(inf, pixel=True, size=360):
    """Image ROC (and pixel ROC) of every class, side by side (``size`` pixels square each),
    drawn by ``utils.plots.draw_roc`` like the report's plots."""
    from dualmem.utils import plots  # matplotlib is imported only when a figure is drawn

    clsnames = np.asarray(inf["clsname"])
    sel = {c: np.flatnonzero(clsnames == c) for c in dict.fromkeys(inf["clsname"])}
    levels = [("image ROC", "score", "label")] + ([("pixel ROC", "maps", "masks")] if pixel
                                                  else [])
    side = size / plots.DPI
    images = []
    for title, key, truth in levels:
        lines = [(c, ranking_curves(inf[key][s], inf[truth][s]),
                  tuple(v / 255.0 for v in PALETTE[k % len(PALETTE)]), f"{c}_roc")
                 for k, (c, s) in enumerate(sel.items())]
        images.append(plots.figure_to_rgb(plots.draw_roc(lines, title, (side, side))))
    return np.concatenate(images, axis=1)


def log_evaluation_images(writer, inf, dataset, thresholds, step, vis_cfg=None, no_masks=()):
    """TensorBoard at an evaluation: ``val/panels`` (a few panels) and ``val/roc``;
    ``no_masks``: the classes without masks (results protocol)."""
    vis_cfg = vis_cfg or VIS_DEFAULTS
    rows = [panel_for(inf, i, dataset, thresholds, vis_cfg.get("normalize", "global"),
                      vis_cfg.get("alpha", 0.5), no_masks)
            for i in summary_indices(inf, int(vis_cfg.get("tensorboard_panels", 8)))]
    grid = stack_rows(rows, max_width=1024)
    if grid is not None:
        writer.add_image("val/panels", grid, step, dataformats="HWC")
    writer.add_image("val/roc", roc_figure(inf), step, dataformats="HWC")
