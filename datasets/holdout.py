"""Training good images held out to set thresholds as a production line does (issue #26).

A class whose image or pixel threshold follows a good-image rule (``evaluator.thresholds``:
``good_fpr`` / ``good_pixel_rate``, or ``auto`` for a class whose test set has no masks or no
anomalies, except on a benchmark layout; ``utils/thresholds.py``) has a share of its training
good images held out: never
trained on nor banked, scored at every evaluation, and its thresholds are read from their
scores, so the figures on the test set say what those thresholds do on unseen images. Classes
under ``f1`` (an annotated test set, the benchmark protocol) keep every training image.

The images held out are chosen by a hash of (seed, class, name relative to the data root): no
random generator is drawn from (training draws stay as they were), and the same data give the
same choice on ``--resume`` and ``--evaluate``. The run records them (``held_out`` in
``run.json`` and every checkpoint).
"""
import hashlib
import logging
import math
from collections import OrderedDict

from dualmem.datasets.manifest import relative_name
from dualmem.utils.config_defaults import DEFAULTS
from dualmem.utils.thresholds import mask_status, threshold_settings, uses_goods

WHY = {"no_masks": "its anomalous test images have no masks",
       "no_anomalies": "its test set has no anomalies"}


class HeldOut:
    """The held-out good images: ``records``, ``dataset`` (reads them as the test set does),
    ``counts`` {class: n} for every class of a good-image rule (0 when it has too few training
    goods to spare one) and ``skipped`` (records ``dataset.on_bad_file: skip`` left out)."""

    def __init__(self, records, dataset, counts, skipped=()):
        self.records, self.dataset = list(records), dataset
        self.counts, self.skipped = OrderedDict(counts), list(skipped)


def holdout_count(n_goods, holdout, holdout_min):
    """How many of a class's ``n_goods`` training good images are held out: ``holdout`` (a
    count, or a share rounded up), at least ``holdout_min`` while half of them stay for
    training, and never all of them (one at least is trained on)."""
    want = int(holdout) if isinstance(holdout, int) else math.ceil(float(holdout) * n_goods)
    want = max(want, min(int(holdout_min), n_goods // 2))
    return max(0, min(want, n_goods - 1))


def _rank(seed, record, roots):
    key = f"{seed}\0{record['clsname']}\0{relative_name(record['filename'], roots)}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def class_status(records):
    """{class: mask status} of test records (``utils.thresholds.mask_status``)."""
    by = OrderedDict()
    for r in records:
        labels, masked = by.setdefault(r["clsname"], ([], []))
        labels.append(int(r["label"]))
        masked.append(bool(r.get("maskname")))
    return OrderedDict((c, mask_status(lab, m)) for c, (lab, m) in by.items())


def hold_out_goods(cfg, train_records, test_records, common, roots=(), seed=0, log=None):
    """``(train_records left, HeldOut or None)``: the builder's one call. ``common``: the
    ManifestDataset arguments of the test set (the held-out images are read like it)."""
    from dualmem.datasets.manifest_dataset import ManifestDataset

    log = log or logging.getLogger("dualmem")
    settings = threshold_settings(cfg)
    status = class_status(test_records)
    classes = [c for c, s in status.items() if uses_goods(settings, s)]
    if not classes:
        return train_records, None
    goods = OrderedDict((c, []) for c in classes)
    for r in train_records:
        if int(r["label"]) == 0 and r["clsname"] in goods:
            goods[r["clsname"]].append(r)
    chosen, counts = set(), OrderedDict()
    rate = float(settings["false_reject_rate"])
    for cls, recs in goods.items():
        n = holdout_count(len(recs), settings["holdout"], settings["holdout_min"])
        counts[cls] = n
        chosen |= {id(r) for r in sorted(recs, key=lambda r: _rank(seed, r, roots))[:n]}
        if n == 0:
            log.warning(f"class '{cls}': {len(recs)} training good image(s), too few to hold "
                        f"any out for its good-image thresholds: they are set on its test "
                        f"set's good images instead (the operating point reported there is "
                        f"then not independent of them)")
            continue
        log.info(f"class '{cls}': {n} of its {len(recs)} training good images held out for "
                 f"its good-image thresholds ({WHY.get(status[cls], 'as configured')}); never "
                 f"trained on or banked")
        if n * rate < 1:
            log.warning(f"class '{cls}': {n} held-out good images are too few for a "
                        f"{100 * rate:g}% false-reject rate ({math.ceil(1 / rate - 1e-9)} "
                        f"needed): its image threshold will lie just above their highest "
                        f"score")
    held = [r for r in train_records if id(r) in chosen]
    kept = [r for r in train_records if id(r) not in chosen]
    skipped = []
    ds = {**DEFAULTS["dataset"], **dict(cfg.dataset)}
    if held and ds["validate"]:  # as the Trainer checks its train and test sets
        from dualmem.datasets.validation import validate_records

        before = held
        held, _ = validate_records(held, common["image_dir"], "the held-out good images",
                                   common["color_mode"], ds["on_bad_file"], False, log)
        ids = {id(r) for r in held}
        skipped = [r for r in before if id(r) not in ids]
        counts = OrderedDict((c, sum(r["clsname"] == c for r in held)) for c in counts)
    return kept, HeldOut(held, ManifestDataset(held, **common) if held else None, counts,
                         skipped)
