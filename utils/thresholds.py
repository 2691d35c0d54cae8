"""Decision thresholds: the rule each class's image and pixel threshold follows, and the rules.

``evaluator.thresholds`` (configs/runtime.yaml shows the defaults):

* ``f1``: the F1-optimal threshold on the test set (the benchmark habit; it needs anomalies in
  the test set, and for pixels their masks). A class where it cannot be computed falls back to
  the good-image rule below, which says why.
* ``good_fpr`` (images): set as a production line sets it, from good images only, at a target
  false-reject rate ``false_reject_rate`` (r): with the n good scores,
  ``t = nextafter(numpy.quantile(goods, 1 - r, method="inverted_cdf"), +inf)``, the next float
  above the smallest good score with at least (1 - r) * n scores at or below it. An image is
  rejected when ``score >= t``, so at most floor(r * n) of those goods are rejected (ties
  included); with n < 1 / r that is none: t lies just above their highest score (said in the
  rule's note). The goods are training good images held out for it (``datasets/holdout.py``),
  never trained on; a class with none falls back to its test set's good images, named so.
* ``good_pixel_rate`` (pixels): the same rule over the held-out goods' pixels at
  ``pixel_rate`` (0.001: the 99.9th percentile); ``none``: no pixel threshold (no masks).
* ``auto`` (default): ``f1`` for a class whose anomalous test images have masks (an annotated
  benchmark), the good-image rules for one without masks or without anomalies (someone's own
  photos), so no verdict comes from invented all-white masks. A benchmark layout
  (``dataset.type`` mvtec, visa, cifar10, ader) keeps its protocol: its training set is never
  cut, its image threshold stays ``f1`` and a class without masks gets its pixel threshold
  from the test set's good images. ``good_fpr`` / ``good_pixel_rate`` asked for by name hold
  goods out whatever the data.

Each entry names its rule (``image_rule``: ``good_fpr(1%, 40 held-out goods)``) and its
parameters (``image_rule_params``); ``operating_point`` counts what the chosen threshold does on
the test set (false rejects among good images, escapes among bad ones).
"""
from collections import OrderedDict

import numpy as np

from dualmem.utils.metrics import f1_optimal_threshold

GOOD_RULE = {"image": "good_fpr", "pixel": "good_pixel_rate"}
RATE_KEY = {"image": "false_reject_rate", "pixel": "pixel_rate"}
from dualmem.datasets.prepare import BENCHMARK_SOURCES as BENCHMARK_TYPES  # noqa: E402
# (the benchmark layouts, whose training set auto never cuts)
QUANTILE = ("nextafter(numpy.quantile(goods, 1 - rate, method='inverted_cdf'), +inf); "
            "rejected: score >= threshold")


def threshold_settings(cfg=None):
    """``evaluator.thresholds`` over the defaults (a config saved before the keys existed, or
    one built in code, gets them; ``utils/config_defaults.py`` holds them)."""
    from dualmem.utils.config_defaults import DEFAULTS

    given = ((cfg or {}).get("evaluator") or {}).get("thresholds") or {}
    kind = ((cfg or {}).get("dataset") or {}).get("type")
    return {**DEFAULTS["evaluator"]["thresholds"], **dict(given),
            "benchmark": kind in BENCHMARK_TYPES}


def mask_status(labels, has_mask=None):
    """A class's test set: ``masks`` (every anomalous image has a mask), ``partial`` (some
    do), ``no_masks`` (none does) or ``no_anomalies``. ``has_mask`` None: all masks real."""
    bad = np.asarray(labels) > 0.5
    if not bad.any():
        return "no_anomalies"
    if has_mask is None:
        return "masks"
    masked = int(np.sum(np.asarray(has_mask, bool)[bad]))
    return "masks" if masked == int(bad.sum()) else "no_masks" if masked == 0 else "partial"


def resolve_rule(settings, level, status):
    """The rule a class's ``level`` ('image' | 'pixel') threshold follows: ``auto`` -> f1 when
    its anomalous test images have masks (a benchmark's images: always), else the good-image
    rule."""
    rule = settings[f"{level}_rule"]
    if rule == "auto":
        masked = status in ("masks", "partial") or (
            level == "image" and settings.get("benchmark"))
        return "f1" if masked else GOOD_RULE[level]
    return rule


def uses_goods(settings, status):
    """Whether a class has training goods held out: a good-image rule at either level, but
    never by ``auto`` on a benchmark layout (its training set is the protocol's)."""
    return any(resolve_rule(settings, level, status) == GOOD_RULE[level] and not (
        settings.get("benchmark") and settings[f"{level}_rule"] == "auto")
        for level in ("image", "pixel"))


def good_rate_threshold(values, rate):
    """The good-image rule's threshold (module docstring): at most floor(rate * n) of
    ``values`` are >= it. Maps keep their float type, so that the next float survives a
    comparison with a map of that type."""
    v = np.asarray(values).ravel()
    if v.dtype.kind != "f":
        v = v.astype(np.float64)
    q = v.dtype.type(np.quantile(v, 1.0 - float(rate), method="inverted_cdf"))
    return float(np.nextafter(q, v.dtype.type(np.inf)))


def _pct(rate):
    return f"{100.0 * float(rate):g}%"


def _good_threshold(level, values, n_images, source, rate, why=None):
    """(threshold, source, rule text, params) of the good-image rule on ``values``."""
    rule = GOOD_RULE[level]
    if n_images == 0:
        return None, "unavailable", "unavailable (no good images)", {
            "rule": rule, RATE_KEY[level]: rate, "goods": 0, "note": why}
    t = good_rate_threshold(values, rate)
    where = "held-out goods" if source == "held_out" else "test goods"
    params = {"rule": rule, RATE_KEY[level]: rate, "goods": int(n_images),
              "goods_from": "training good images held out (never trained on)"
              if source == "held_out" else "the test set's good images (none held out)",
              "quantile": QUANTILE,
              "rejected_goods": int(np.count_nonzero(np.asarray(values) >= t))}
    notes = [why] if why else []
    if level == "image" and n_images * rate < 1:
        notes.append(f"only {n_images} good images for a {_pct(rate)} false-reject rate "
                     f"({int(np.ceil(1 / rate - 1e-9))} needed): the threshold lies just above "
                     f"their highest score")
    if notes:
        params["note"] = "; ".join(notes)
    return t, rule, f"{rule}({_pct(rate)}, {int(n_images)} {where})", params


def level_threshold(level, rule, values, truth, goods, rate, status):
    """One level's (threshold, source, rule text, params). ``values``/``truth``: the test
    scores and labels (or maps and masks: only images whose mask is real); ``goods``:
    ``(values, n_images, 'held_out' | 'test')`` for the good-image rule."""
    if rule == "none":
        return None, "none", "none", {"rule": "none"}
    why = None
    if rule == "f1":
        t = f1_optimal_threshold(values, truth) if len(values) else None
        if t is not None:
            return t, "f1", "f1(test set)", {"rule": "f1", "on": "the test set"}
        why = "f1 not available: " + (
            "no anomalies in the test set" if status == "no_anomalies" else
            "no masks" if status == "no_masks" and level == "pixel" else
            "the masks hold one kind of pixel only" if level == "pixel" else
            "no good images in the test set")
    return _good_threshold(level, goods[0], goods[1], goods[2], rate, why)


def _min_max(x, chunk=1 << 22):
    """(min, max) in float32 chunks: numpy reduces float16 ~3x slower than float32."""
    flat = np.asarray(x).reshape(-1)
    lo, hi = np.inf, -np.inf
    for a in range(0, flat.size, chunk):
        c = flat[a:a + chunk].astype(np.float32, copy=False)
        lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    return lo, hi


def _entry(inf, sel, held_sel, settings, map_range=None):
    """The thresholds of the images ``sel`` (indices into ``inf``, None: all); ``held_sel``:
    indices of their held-out goods (None or empty: nothing held out)."""
    take = (lambda a: a) if sel is None else (lambda a: a[sel])  # None: all (no copy)
    labels, scores = take(inf["label"]), take(inf["score"])
    has_mask = None if inf.get("has_mask") is None else take(np.asarray(inf["has_mask"], bool))
    status = mask_status(labels, has_mask)
    rules = {lv: resolve_rule(settings, lv, status) for lv in ("image", "pixel")}
    good = labels <= 0.5
    held = None if held_sel is None or len(held_sel) == 0 else held_sel
    maps = take(inf["maps"])
    entry = {"n_images": int(len(scores)), "n_anomalous": int(np.sum(~good)), "masks": status}
    for level in ("image", "pixel"):
        if level == "image":
            values, truth = scores, labels
            goods = (inf["held"]["score"][held], len(held), "held_out") if held is not None \
                else (scores[good], int(good.sum()), "test")
        else:  # f1 only over images whose mask is a real file (goods: all normal)
            if status == "masks":
                values, truth = maps, take(inf["masks"])
            elif status == "partial":
                real = good | has_mask
                values, truth = maps[real], take(inf["masks"])[real]
            else:  # no masks, or no anomalies: f1 is not available
                values, truth = np.zeros(0), np.zeros(0)
            goods = (inf["held"]["maps"][held], len(held), "held_out") if held is not None \
                else (maps[good], int(good.sum()), "test")
        t, source, text, params = level_threshold(
            level, rules[level], values, truth, goods, settings[RATE_KEY[level]], status)
        entry.update({f"{level}_threshold": t, f"{level}_threshold_source": source,
                      f"{level}_rule": text, f"{level}_rule_params": params})
    entry.update({"image_min": float(np.min(scores)), "image_max": float(np.max(scores))})
    entry["map_min"], entry["map_max"] = map_range or _min_max(maps)
    return entry


def compute_thresholds(inf, score_cfg, classes=None, settings=None, epoch=None, held=None):
    """Per-class decision thresholds and normalisation ranges from one evaluation.

    ``inf``: ``utils.evaluator.run_inference`` output, with ``has_mask`` (per image: its mask
    is a real file) when known; ``settings``: ``threshold_settings(cfg)``; ``held``: the
    held-out goods' ``{"clsname", "score", "maps"}`` (``datasets/holdout.py``). The rules are
    in the module docstring; F1 ties pick the higher threshold. ``image_min/max`` and
    ``map_min/max`` are the ranges of normalised scores and of the 'global' heat-map colouring.
    ``global`` treats all classes pooled as one (what prediction uses when an image's class
    is unknown), its rules following from the pooled test set as a class's do.
    """
    settings = threshold_settings() if settings is None else settings
    inf = dict(inf, held=held)
    clsnames = np.asarray(inf["clsname"])
    held_names = np.asarray(held["clsname"]) if held else np.zeros(0, dtype=object)
    per_class = OrderedDict()
    for cls in classes or sorted(set(inf["clsname"])):
        sel = np.flatnonzero(clsnames == cls)
        if sel.size:
            per_class[cls] = _entry(inf, sel, np.flatnonzero(held_names == cls) if held
                                    else None, settings)
    if len(per_class) <= 1:
        pooled = dict(next(iter(per_class.values()), {}))
    else:  # all classes as one: its rules follow from its pooled mask status
        pooled = _entry(inf, None, np.arange(len(held_names)) if held else None, settings,
                        (min(e["map_min"] for e in per_class.values()),
                         max(e["map_max"] for e in per_class.values())))
    return {"format": 2, "epoch": epoch, "image_score": dict(score_cfg),
            "rules": {k: settings[k] for k in ("image_rule", "false_reject_rate", "pixel_rule",
                                               "pixel_rate", "holdout", "holdout_min")},
            "per_class": per_class, "global": pooled}


def operating_points(inf, thresholds):
    """Per class, what its image threshold does on the test set: false rejects (good images
    scored >= it) and escapes (bad images below it), with counts; None rates where a kind is
    absent, None counts where the class has no threshold."""
    out = OrderedDict()
    clsnames = np.asarray(inf["clsname"])
    for cls, entry in ((thresholds or {}).get("per_class") or {}).items():
        sel = clsnames == cls
        scores, labels = inf["score"][sel], inf["label"][sel]
        t = entry.get("image_threshold")
        n_good, n_bad = int(np.sum(labels <= 0.5)), int(np.sum(labels > 0.5))
        fr = None if t is None else int(np.sum(scores[labels <= 0.5] >= t))
        es = None if t is None else int(np.sum(scores[labels > 0.5] < t))
        out[cls] = {"image_threshold": t, "rule": entry.get("image_rule"),
                    "false_rejects": fr, "good": n_good,
                    "false_reject_rate": None if fr is None or not n_good else fr / n_good,
                    "escapes": es, "bad": n_bad,
                    "escape_rate": None if es is None or not n_bad else es / n_bad}
    return out


def rules_summary(thresholds, held_counts=None):
    """``protocol["thresholds"]``: each level's rule (one text when every class shares it,
    else per class), the held-out good images per class, and any rule's note."""
    per_class = (thresholds or {}).get("per_class") or {}
    out = {}
    for level in ("image", "pixel"):
        texts = OrderedDict((c, e.get(f"{level}_rule")) for c, e in per_class.items())
        out[level] = next(iter(texts.values())) if len(set(texts.values())) == 1 else texts
    if held_counts:
        out["held_out"] = dict(held_counts)
    notes = {f"{c} {level}": e[f"{level}_rule_params"]["note"] for c, e in per_class.items()
             for level in ("image", "pixel") if e[f"{level}_rule_params"].get("note")}
    if notes:
        out["notes"] = notes
    return out
