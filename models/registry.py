"""Name -> class registry for everything a config's ``net:`` list can build.

UniAD configs name modules by dotted path (``models.necks.MFCN``); users of timm expect short
names. One registry serves both: a class is stored under its short name and its dotted path,
and a dotted path that is not registered is imported, so user modules work without registering.
"""
import difflib
import importlib


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
        if key in self._entries:
            return self._entries[key]
        if "." in key:
            module_path, attr = key.rsplit(".", 1)
            try:
                module = importlib.import_module(module_path)
            except ImportError:
                module = None
            if module is not None:
                # importing may have registered it
                if key in self._entries:
                    return self._entries[key]
                if hasattr(module, attr):
                    return getattr(module, attr)
        close = difflib.get_close_matches(key, self._entries, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        short = sorted(k for k in self._entries if "." not in k)
        raise KeyError(f"unknown {self.name} type '{key}'.{hint} Registered: {', '.join(short)}")


MODELS = Registry("model")
