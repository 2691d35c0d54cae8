"""The unified semi-supervised protocol: a few annotated anomalies per class move from the test
set into training.

``dataset.seen_anomalies: {num_per_class: k, seed: s, classes: [...] | null, join_training}``
draws ``k`` anomalous test images (with their masks) per class, deterministically by ``seed``,
removes them from the test set and, with ``join_training: true`` (default), appends them to the
training records as labelled anomalies. ``classes`` limits which classes give anomalies (DMAD's
cross-class analysis); ``join_training: false`` only removes them, which evaluates an
unsupervised model on exactly the semi-supervised run's test set.

The files are recorded by their name relative to their data root (as in a single-root
manifest), so the record holds no machine path and still names them after the data moved.
"""
import zlib

import numpy as np
from dualmem.datasets.manifest import relative_name
from dualmem.utils.errors import UserError


def split_seen_anomalies(test_records, num_per_class, seed=0, classes=None):
    """(seen, remaining_test): ``num_per_class`` anomalous records drawn per class.

    The draw for a class depends only on (seed, class name, that class's anomalous file names),
    not on the other classes or the record order. A class must keep at least one anomaly for
    testing; an anomaly without a mask is refused (the Filter needs pixel annotations).
    """
    k = int(num_per_class)
    if k < 0:
        raise UserError(f"dataset.seen_anomalies.num_per_class must be >= 0, got {k}")
    present = sorted({r["clsname"] for r in test_records})
    chosen_classes = present if classes is None else list(classes)
    missing = [c for c in chosen_classes if c not in present]
    if missing:
        raise UserError(f"dataset.seen_anomalies.classes: {missing} not among the test classes "
                         f"({', '.join(present)})")
    if k == 0:
        return [], list(test_records)
    take = set()
    for cls in chosen_classes:
        anomalous = sorted((r["filename"], i) for i, r in enumerate(test_records)
                           if r["clsname"] == cls and int(r["label"]) == 1)
        if len(anomalous) <= k:
            raise UserError(f"dataset.seen_anomalies.num_per_class {k}: class '{cls}' has only "
                             f"{len(anomalous)} anomalous test image(s); at least one must stay "
                             f"in the test set")
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(cls.encode())])
        for j in sorted(rng.permutation(len(anomalous))[:k].tolist()):
            name, i = anomalous[j]
            if not test_records[i].get("maskname"):
                raise UserError(f"dataset.seen_anomalies: anomalous test image {name} has no "
                                 f"mask (maskname); seen anomalies need pixel annotations")
            take.add(i)
    seen = [dict(test_records[i]) for i in sorted(take)]
    remaining = [r for i, r in enumerate(test_records) if i not in take]
    return seen, remaining


def apply_seen_anomalies(ds_cfg, train_records, test_records, roots=()):
    """``dataset.seen_anomalies`` applied: (train_records, test_records, protocol info or None).
    ``roots``: the data roots, to record the files relative to them."""
    cfg = dict(ds_cfg.get("seen_anomalies") or {})
    if not cfg or not int(cfg.get("num_per_class", 0)):
        return train_records, test_records, None
    unknown = sorted(set(cfg) - {"num_per_class", "seed", "classes", "join_training"})
    if unknown:
        raise UserError(f"dataset.seen_anomalies: unknown key(s) {unknown}")
    k, seed = int(cfg["num_per_class"]), int(cfg.get("seed", 0))
    classes = cfg.get("classes")
    seen, test_records = split_seen_anomalies(test_records, k, seed, classes)
    join = bool(cfg.get("join_training", True))
    if join:
        train_records = list(train_records) + seen
    info = {"num_per_class": k, "seed": seed,
            "classes": None if classes is None else list(classes),
            "join_training": join, "files": [relative_name(r["filename"], roots) for r in seen]}
    return train_records, test_records, info


def refuse_scored_anomalies(train_records, test_records, image_dir=None):
    """Refuse a test set that still holds a labelled anomaly the run trains on: the same file
    (by its real path, so a record listed twice or a symlink is caught) or the same bytes
    under another name (a copy, a hard link, a renamed file). Names alone would miss them."""
    import hashlib
    import os

    def path(rec):
        name = str(rec["filename"])
        return name if os.path.isabs(name) or not image_dir else os.path.join(image_dir, name)

    def size(p):
        try:
            return os.stat(p).st_size
        except OSError:
            return None

    cache = {}

    def digest(p):  # a file is read only when its size matches an anomaly's
        if p not in cache:
            with open(p, "rb") as f:
                cache[p] = hashlib.sha256(f.read()).hexdigest()
        return cache[p]

    anomalies = [path(r) for r in train_records if int(r["label"]) == 1]
    if not anomalies:
        return
    real = {os.path.realpath(p) for p in anomalies}
    by_size = {}
    for p in anomalies:
        if size(p) is not None:
            by_size.setdefault(size(p), set()).add(p)
    hits = []
    for rec in test_records:
        p = path(rec)
        n = size(p)
        if os.path.realpath(p) in real or n in by_size and digest(p) in {
                digest(q) for q in by_size[n]}:
            hits.append(str(rec["filename"]))
    if hits:
        more = f" and {len(hits) - 10} more" if len(hits) > 10 else ""
        raise UserError(f"the test set holds {len(hits)} image(s) that are labelled anomalies "
                        f"the run trains on (dataset.seen_anomalies or label 1 in the train "
                        f"manifest), listed twice or under another name: "
                        f"{', '.join(hits[:10])}{more}; scoring them would inflate the "
                        f"figures. Remove them from the test manifest")
