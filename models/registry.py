"""Name -> class registry for everything a config's ``net:`` list can build.

UniAD configs name modules by dotted path (``models.necks.MFCN``); users of timm expect short
names. One registry serves both: a class is stored under its short name and its dotted path.

A config is a file a user may have been sent (or one stored in a checkpoint or a run folder),
so a ``type`` never imports code on its own say: a name resolves only to a registered DualMem
class (a ``models.`` dotted path may import DualMem's own module to find it). Anything else is
refused by name before any import, unless the person running the command names the code
they trust on the command line: ``--plugins MODULE`` imports that module (whose classes
register themselves or are named by dotted path under it), ``--trust_checkpoint`` lifts the
rule for a source trusted as a whole (:func:`trust_plugins`, :func:`trust_everything`).
"""
import difflib
import importlib
import os
import sys

from dualmem.utils.errors import UserError

_OWN_PACKAGE = "models"  # as configs spell it (UniAD's dotted paths); imported as dualmem.models
_IMPORT_PREFIX = "dualmem."
RESERVED_PLUGIN_NAMES = (_OWN_PACKAGE, "dualmem")
_trusted_prefixes = set()  # module names the user named on the command line
_trust_all = [False]


class UntrustedTypeError(UserError, KeyError):
    """A config names code that is neither registered nor trusted by the user."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def trust_plugins(modules):
    """Import the modules the user named (``--plugins``): their classes may be built."""
    names = [n for n in (str(m).strip() for m in modules or ()) if n]
    for name in names:
        if name.split(".")[0] in RESERVED_PLUGIN_NAMES:
            raise UserError(f"--plugins {name}: '{name.split('.')[0]}' names DualMem's own "
                            f"modules (a config's 'models.X' is DualMem's dualmem.models.X), so "
                            f"a plugin cannot be called that; rename your package")
    if names and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # a tool run as a script: its folder is first, not cwd
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"--plugins {name}: cannot import it ({exc}); it must be importable "
                            f"from the current directory or the Python path") from None
        _trusted_prefixes.add(name)


def trust_everything(flag=True):
    """``--trust_checkpoint``: the user trusts the file's source, so any dotted path goes."""
    _trust_all[0] = bool(flag)


class everything_trusted:
    """``with everything_trusted(flag):`` lifts the rule for one trusted load, then restores."""

    def __init__(self, flag=True):
        self.flag = bool(flag)

    def __enter__(self):
        self.before = _trust_all[0]
        _trust_all[0] = self.before or self.flag

    def __exit__(self, *exc):
        _trust_all[0] = self.before


def reset_trust():
    _trusted_prefixes.clear()
    _trust_all[0] = False


def _trusted_module(module_path):
    if _trust_all[0]:
        return True
    return any(module_path == p or module_path.startswith(p + ".") for p in _trusted_prefixes)


class Registry:
    def __init__(self, name):
        self.name = name
        self._entries = {}

    def register(self, name=None, aliases=(), path=None):
        """Decorator. ``path`` is the UniAD-style dotted prefix, e.g. ``models.necks``."""

        def deco(obj):
            short = name or obj.__name__
            keys = [short, *aliases]
            if path:
                keys += [f"{path}.{k}" for k in [short, *aliases]]
            for key in keys:
                if key in self._entries and self._entries[key] is not obj:
                    raise KeyError(f"{self.name} registry: '{key}' is already registered "
                                   f"to {self._entries[key]!r}")
                self._entries[key] = obj
            return obj

        return deco

    def names(self):
        return sorted(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def get(self, key):
        if not isinstance(key, str) or not key:
            raise UntrustedTypeError(f"{self.name} type must be a non-empty string, got {key!r}")
        if key.startswith(_IMPORT_PREFIX + _OWN_PACKAGE + "."):
            key = key[len(_IMPORT_PREFIX):]  # 'dualmem.models.X' is 'models.X'
        if key in self._entries:
            return self._entries[key]
        if "." in key:
            module_path, attr = key.rsplit(".", 1)
            own = module_path == _OWN_PACKAGE or module_path.startswith(_OWN_PACKAGE + ".")
            if own or _trusted_module(module_path):
                try:
                    module = importlib.import_module(_IMPORT_PREFIX + module_path if own
                                                     else module_path)
                except ImportError:
                    module = None
                if module is not None:
                    if key in self._entries:  # importing may have registered it
                        return self._entries[key]
                    found = getattr(module, attr, None)
                    # DualMem's own module: only a registered class (or --trust_checkpoint);
                    # --plugins trust the user's modules, never DualMem's internals
                    if found is not None and (not own or _trust_all[0]
                                              or found in self._entries.values()):
                        return found
            elif module_path.split(".")[0] == "dualmem":
                raise UntrustedTypeError(
                    f"{self.name} type '{key}' is not a registered DualMem {self.name}: a config "
                    f"names DualMem's modules as 'models.<...>' (registered classes only); it "
                    f"was refused before importing anything")
            else:
                raise UntrustedTypeError(
                    f"{self.name} type '{key}' is not a registered DualMem {self.name}; it was "
                    f"refused before importing anything, because a config (or a checkpoint or "
                    f"run folder that stores one) must not run code on its own say. For your "
                    f"own module, name it on the command line: --plugins "
                    f"{module_path.split('.')[0]} (or --trust_checkpoint for a file from a "
                    f"source you trust)")
        close = difflib.get_close_matches(key, self._entries, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        short = sorted(k for k in self._entries if "." not in k)
        raise UntrustedTypeError(f"unknown {self.name} type '{key}'.{hint} Registered: "
                                 f"{', '.join(short)}")


MODELS = Registry("model")
