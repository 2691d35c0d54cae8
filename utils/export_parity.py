"""Does an exported file reproduce the eager model? The check ``tools/export.py`` runs before
anything is written.

The reference is the eager model as an exported graph computes it: the whole model on images in
float32 on the CPU (``utils.inference.FLOAT32``), through ``utils.detector.Detector`` (the one
inference path) and the checkpoint's own preprocessing. It runs on real test images (the run's
test manifest, or ``--images``) and on random images of another size (the resize is checked
too); the exported pair runs on the same files through its sidecar's preprocessing.

Any map that differs by more than ``MAP_RTOL`` of its largest absolute value, any image score
that differs by more than ``SCORE_RTOL`` of the largest score, or any change in the order of the
image scores (pairs closer than ``TIE_RTOL`` of the largest score count as ties) fails, unless
the eager model itself moves as much when its input moves by float32 rounding (a k-NN tie, see
:func:`eager_noise`).
"""
import numpy as np
import torch

from dualmem.utils.errors import UserError
from dualmem.utils.exported_model import ExportError

MAP_RTOL = 1e-4     # of each map's largest absolute value
SCORE_RTOL = 1e-4   # of the largest absolute image score of the set
TIE_RTOL = 1e-6     # scores closer than this (of the largest) are ties: their order is free
NUM_RANDOM = 4
NOISE_EPS = 1e-6  # input perturbation that measures the eager model's own reproducibility


# ----------------------------------------------------------------------------- inputs
def spread(items, n):
    """``n`` items evenly spread over ``items`` (all of them when there are fewer)."""
    if n <= 0 or len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, n).round().astype(int)))]


def check_images(cfg, state, images=None, max_images=32):
    """(path, name) pairs: ``images`` (a file or folder), else the run's test manifest."""
    if images:
        from dualmem.utils.prediction import find_images

        found = find_images(images)
        if not found:
            raise ExportError(f"no image files under {images}")
        return [(str(p), rel) for p, rel in spread(found, max_images)]
    from dualmem.datasets.builder import build_datasets

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


# ----------------------------------------------------------------------------- eager reference
def eager_reference(model, cfg, state):
    """The checkpoint's :class:`utils.detector.Detector` run as the exported graph computes:
    the whole model in float32 on the CPU."""
    from dualmem.utils.detector import Detector
    from dualmem.utils.inference import FLOAT32

    return Detector(model, cfg, state, torch.device("cpu"), inference=FLOAT32)


def eager_outputs(reference, items, batch_size=4):
    """(maps, scores) of the reference on files / arrays, by the checkpoint's preprocessing."""
    from dualmem.utils.detector import as_batch

    maps = np.concatenate([reference.anomaly_maps(as_batch(items[i:i + batch_size],
                                                           reference.spec)[0])
                           for i in range(0, len(items), batch_size)])
    return maps, reference.scores(maps)


def eager_noise(reference, items, eager_maps, eager_scores, indices, trials=3, eps=NOISE_EPS,
                seed=0):
    """(map change relative to the map's max, absolute score change) of the eager model when
    each preprocessed input moves by N(0, eps^2) (a few float32 rounding steps), the largest of
    ``trials``; zero outside ``indices``."""
    from dualmem.utils.detector import as_batch

    map_noise, score_noise = np.zeros(len(items)), np.zeros(len(items))
    g = torch.Generator().manual_seed(seed)
    for i in indices:
        x = as_batch([items[i]], reference.spec)[0]
        scale = max(float(np.abs(eager_maps[i]).max()), 1e-12)
        for _ in range(trials):
            m = reference.anomaly_maps(x + eps * torch.randn(x.shape, generator=g))
            map_noise[i] = max(map_noise[i], float(np.abs(m[0] - eager_maps[i]).max()) / scale)
            score_noise[i] = max(score_noise[i], abs(float(reference.scores(m)[0])
                                                     - float(eager_scores[i])))
    return map_noise, score_noise


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


def check_exported(reference, exported, files, noise, eager):
    """{set name: :func:`compare` result} for the exported pair as it will be used: ``files``
    ((path, name) pairs) through the sidecar's preprocessing in batches of 3 (not the traced
    2), and each random image of ``noise`` alone; ``eager``: {set name: (maps, scores)} of the
    reference. Where a set fails, the eager model's own noise there is measured and allowed."""
    from dualmem.utils.exported_model import run_exported

    paths, names = [p for p, _ in files], [n for _, n in files]
    maps, scores = run_exported(exported, paths, batch_size=3)
    r_maps, r_scores = zip(*(run_exported(exported, [img]) for img in noise))
    sets = {"test images": (paths, names, maps, scores),
            "random images": (noise, [f"<random {i}>" for i in range(len(noise))],
                              np.concatenate(r_maps), np.concatenate(r_scores))}
    results = {}
    for what, (items, labels, x_maps, x_scores) in sets.items():
        e_maps, e_scores = eager[what]
        res = compare(labels, e_maps, e_scores, x_maps, x_scores)
        if res["suspects"] and res["rank_changes"] is not None:
            # is the eager model itself that sensitive there (a k-NN tie)?
            res = compare(labels, e_maps, e_scores, x_maps, x_scores,
                          eager_noise(reference, items, e_maps, e_scores, res["suspects"]))
        results[what] = res
    return results


def parity_record(results):
    """The sidecar's ``parity`` entry: per set the figures and the tolerated ties, and the
    limits."""
    parity = {what: {k: res[k] for k in ("images", "max_map_diff_rel",
                                          "max_score_diff_rel", "rank_changes")}
              for what, res in results.items()}
    for what, res in results.items():
        parity[what]["tolerated_ties"] = res["tolerated"]
    parity["limits"] = {"map_rel": MAP_RTOL, "score_rel": SCORE_RTOL, "tie_rel": TIE_RTOL,
                        "eager_noise_input_eps": NOISE_EPS}
    return parity
