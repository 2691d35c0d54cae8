"""Dataset preparation: each source as distributed -> UniAD JSON-lines manifests.

One module per source (``mvtec``, ``visa``, ``cifar10``, ``folder``, ``ader``) scans and
returns a :class:`Prepared`; :func:`check_records` validates files; ``cache`` prepares on the
fly for ``dataset.data_root`` and reuses the result while the source is unchanged.
``tools/prepare_data.py`` is the command-line front end.
"""
from pathlib import Path

from dualmem.datasets.prepare.common import (Prepared, PrepareError, check_records, summary,
                                     summary_table, write_prepared)

SOURCES = ("mvtec", "visa", "cifar10", "ader", "folder")  # the one list of data sources
BENCHMARK_SOURCES = tuple(s for s in SOURCES if s != "folder")  # a protocol's own split
__all__ = ["Prepared", "PrepareError", "check_records", "summary", "summary_table",
           "write_prepared", "SOURCES", "BENCHMARK_SOURCES", "build_source", "source_fingerprint",
           "looks_like_folder", "GOOD_NAMES", "BAD_NAMES", "MASK_NAMES"]


def _module(source):
    import importlib

    if source not in SOURCES:
        raise PrepareError(f"unknown dataset source '{source}'; choose from {', '.join(SOURCES)}")
    return importlib.import_module(f"dualmem.datasets.prepare.{source}")


# the folder names a user's own image folder may use (README "Your own images")
GOOD_NAMES = ("good", "normal", "ok")
BAD_NAMES = ("bad", "defective", "anomaly", "ng")
MASK_NAMES = ("masks", "mask", "ground_truth")


def looks_like_folder(root):
    """Whether ``root`` is a user's folder of images (good/, bad/, masks/ by any of the names
    above) rather than a benchmark tree (class folders holding train/)."""
    root = Path(root)
    if not root.is_dir() or not any((root / n).is_dir() for n in GOOD_NAMES):
        return False
    return not any(p.is_dir() and (p / "train").is_dir() for p in root.iterdir())


def _folder_args(root, options):
    """``dataset.type: folder`` with a data_root: ``good/`` plus optional ``bad/``, ``masks/``."""
    root = Path(root)
    sub = lambda *names: next((str(root / n) for n in names if (root / n).is_dir()), None)  # noqa
    return dict(good=sub(*GOOD_NAMES) or str(root / "good"), bad=sub(*BAD_NAMES),
                masks=sub(*MASK_NAMES), root=str(root), **options)


def build_source(source, root, classes=None, export_dir=None, **options):
    """Records of one source rooted at ``root`` (a folder, or an ADer meta.json file)."""
    mod = _module(source)
    if source == "cifar10":
        return mod.build(root, export_dir=export_dir, **options)
    if source == "folder":
        return mod.build(**_folder_args(root, options))
    return mod.build(root, classes=classes, **options)


def source_fingerprint(source, root, classes=None, **options):
    mod = _module(source)
    if source == "cifar10":
        return mod.fingerprint(root)
    if source == "folder":
        return mod.fingerprint(**_folder_args(root, options))
    return mod.fingerprint(root, classes=classes)
