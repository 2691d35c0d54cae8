"""Bind the import package ``dualmem`` to this checkout, for a tool run as a script.

DualMem's packages (models, datasets, utils, tools) import each other as ``dualmem.<package>``,
so that they never clash with a user's own ``utils`` or Hugging Face's ``datasets``.
``pip install -e .`` (the README's install) maps ``dualmem`` to the checkout from any working
directory; a tool run from a checkout uses that checkout, installed or not, so a second
checkout installed elsewhere is never picked up by mistake. The checkout's root is not put on
``sys.path``: nothing imports ``utils`` or ``models`` under their bare names.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: ``dualmem.*`` is looked up in the bound checkout only, so a
    module missing there is an error, never taken from another (installed) checkout."""

    def __init__(self, root):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("dualmem."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {fullname!r} in the checkout "
                                      f"{self.root}", name=fullname)
        return spec


def _origin(module):
    """The checkout a loaded ``dualmem.<package>`` module comes from."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    depth = module.__name__.count(".") + (1 if file.endswith("__init__.py") else 0)
    return str(Path(file).resolve().parents[depth - 1])


def bind(root=ROOT):
    """Make ``import dualmem.X`` load ``root/X`` and nothing else; refuse if modules of another
    checkout are loaded already."""
    root = str(Path(root).resolve())
    loaded = {name: _origin(m) for name, m in list(sys.modules.items())
              if name.startswith("dualmem.") and m is not None}
    other = sorted(n for n, where in loaded.items() if where not in (None, root))
    if other:
        raise ImportError(f"dualmem is already imported from {loaded[other[0]]} ({other[0]}, "
                          f"...); this checkout is {root}")
    if not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFinder(root))
    current = sys.modules.get("dualmem")
    if current is not None and loaded:
        current.__path__ = [root]  # came in through the editable install of this checkout
        return current
    spec = importlib.machinery.ModuleSpec("dualmem", None, is_package=True)
    spec.submodule_search_locations = [root]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "DualMem, bound to the checkout at " + root
    sys.modules["dualmem"] = module
    return module


bind()
