"""VisA: the original release read through ``split_csv/1cls.csv``, or a converted tree.

The CSV (columns object, split, label, image, mask; label normal/anomaly) is the split every
paper uses; reading it directly avoids the usual copy into MVTec layout. Raw VisA masks hold
small label values (0 and 1..k, not 0/255): the dataset reads any non-zero value of such a mask
as anomalous (see ``datasets.manifest_dataset.read_binary_mask``).
"""
import csv
from pathlib import Path

from dualmem.datasets.prepare import mvtec
from dualmem.datasets.prepare.common import Prepared, PrepareError, stat_fingerprint

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
           "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")


def _rows(csv_path):
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise PrepareError(f"{csv_path}: missing column(s) {missing}; expected "
                               f"{', '.join(COLUMNS)}, found {', '.join(header) or 'nothing'}")
        for lineno, row in enumerate(reader, start=2):
            yield lineno, {k.strip(): (v or "").strip() for k, v in row.items() if k}


def build_from_csv(root, classes=None):
    root = Path(root).resolve()
    csv_path = root / SPLIT_CSV
    train, test = [], []
    seen = []
    for lineno, row in _rows(csv_path):
        where = f"{csv_path}, line {lineno}"
        cls, split, label = row["object"], row["split"].lower(), row["label"].lower()
        if not cls:
            raise PrepareError(f"{where}: empty 'object'")
        if cls not in seen:
            seen.append(cls)
        if split not in ("train", "test"):
            raise PrepareError(f"{where}: split must be train or test, got {row['split']!r}")
        if label not in ("normal", "anomaly"):
            raise PrepareError(f"{where}: label must be normal or anomaly, got {row['label']!r}")
        if not row["image"]:
            raise PrepareError(f"{where}: empty 'image'")
        if classes and cls not in classes:
            continue
        anomalous = label == "anomaly"
        rec = {"filename": row["image"], "label": int(anomalous),
               "label_name": "defective" if anomalous else "good"}
        if anomalous:
            if not row["mask"]:
                raise PrepareError(f"{where}: anomalous image {row['image']} has no mask")
            rec["maskname"] = row["mask"]
        rec["clsname"] = cls
        (train if split == "train" else test).append(rec)
    if classes:
        unknown = [c for c in classes if c not in seen]
        if unknown:
            raise PrepareError(f"unknown class(es) {unknown} in {csv_path}; available: {seen}")
    return Prepared(train, test, str(root), source=f"VisA split {csv_path}")


def build(root, classes=None):
    root = Path(root).resolve()
    if (root / SPLIT_CSV).is_file():
        return build_from_csv(root, classes)
    if mvtec.is_mvtec_tree(root):
        prepared = mvtec.build(root, classes)
        prepared.source = f"VisA (MVTec layout) {root}"
        return prepared
    raise PrepareError(f"{root} is neither the VisA release (no {SPLIT_CSV}) nor a converted "
                       f"MVTec-layout tree (no <class>/train folder)")


def fingerprint(root, classes=None):
    root = Path(root).resolve()
    if (root / SPLIT_CSV).is_file():
        return stat_fingerprint([root / SPLIT_CSV])
    return mvtec.fingerprint(root, classes)
