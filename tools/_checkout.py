"""Bind the import package ``dualmem`` to this checkout, for a tool run as a script.

DualMem's packages (models, datasets, utils, tools) import each other as ``dualmem.<package>``,
so that they never clash with a user's own ``utils`` or Hugging Face's ``datasets``.
``pip install -e .`` (the README's install) maps ``dualmem`` to the checkout from any working
directory; a tool run from a checkout uses that checkout, installed or not, so a second
checkout installed elsewhere is never picked up by mistake. The checkout's root is not put on
``sys.path``: nothing imports ``utils`` or ``models`` under their bare names.
"""
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bind(root=ROOT):
    """Make ``import dualmem.X`` load ``root/X``; refuse if another checkout is in use."""
    root = str(Path(root).resolve())
    current = sys.modules.get("dualmem")
    if current is not None:
        paths = [str(Path(p).resolve()) for p in getattr(current, "__path__", [])
                 if not str(p).startswith("__editable__")]
        if root in paths:
            return current
        loaded = sorted(n for n in sys.modules if n.startswith("dualmem."))
        if loaded:
            raise ImportError(f"dualmem is already imported from {paths or current!r} "
                              f"({loaded[0]}, ...); this checkout is {root}")
    spec = importlib.machinery.ModuleSpec("dualmem", None, is_package=True)
    spec.submodule_search_locations = [root]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "DualMem, bound to the checkout at " + root
    sys.modules["dualmem"] = module
    return module


bind()
