"""MVTec-AD layout (``<cls>/train/good``, ``<cls>/test/<defect>``, ``<cls>/ground_truth``).

Also the layout VisA, MPDD, BTAD and most other benchmarks are converted into, so this is the
default source for ``--data_root``.
"""
from pathlib import Path

from datasets.manifest import build_mvtec_records
from datasets.prepare.common import Prepared, PrepareError, stat_fingerprint


def is_mvtec_tree(root):
    root = Path(root)
    return root.is_dir() and any(p.is_dir() and (p / "train").is_dir() for p in root.iterdir())


def build(root, classes=None):
    root = Path(root).resolve()
    try:
        train, test = build_mvtec_records(root, classes)
    except FileNotFoundError as exc:
        raise PrepareError(str(exc)) from None
    except ValueError as exc:
        raise PrepareError(str(exc)) from None
    return Prepared(train, test, str(root), source=f"MVTec-layout tree {root}")


def fingerprint(root, classes=None):
    root = Path(root).resolve()
    return stat_fingerprint([root / c for c in classes] if classes else [root])
