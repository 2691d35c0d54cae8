"""YAML configs: ``_base_`` composition, ``--opts`` overrides, path resolution and validation.

A config is a tree of plain dicts/lists turned into an EasyDict at the end. Validation is
schema driven (``utils.config_schema``) so that a misspelled key fails before a long run starts,
with the closest valid key suggested.
"""
import copy
import os
import re
from pathlib import Path

import yaml
from easydict import EasyDict

from dualmem.utils.config_defaults import apply_defaults

from dualmem.utils.config_schema import SCHEMA, ListOf, OptionalT, PathT
from dualmem.utils.config_validation import (ConfigError, _record_origins, _set_origin,  # noqa: F401
                                     origin_of, validate_config)


# ----------------------------------------------------------------------------- loading

class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads numbers as YAML 1.2 does: ``1e-4``, ``1E5``, ``-2.5e-3`` are floats.

    PyYAML follows YAML 1.1, whose float pattern needs a dot and a signed exponent, so ``1e-4``
    came back as the string '1e-4'. The YAML 1.2 core-schema float pattern is added after the
    built-in resolvers: ints, bools, null, ``.inf``/``.nan`` and 1.1 floats resolve as before.
    Only this class is changed, not PyYAML's own loaders.
    """


class ConfigDumper(yaml.SafeDumper):
    """SafeDumper that knows the same numbers, so a string such as '1e5' is written quoted and
    :func:`save_config` files read back unchanged."""


_YAML12_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
for _cls in (ConfigLoader, ConfigDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))
del _cls


def load_yaml(text_or_stream):
    """Parse YAML with :class:`ConfigLoader` (YAML 1.2 numbers, safe types only)."""
    return yaml.load(text_or_stream, Loader=ConfigLoader)


def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = load_yaml(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        line = ""
        if mark is not None:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            if 0 <= mark.line < len(lines):
                line = f"\n    {lines[mark.line]}\n    {' ' * mark.column}^"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}{line}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping, got "
                          f"{type(data).__name__}")
    return data


def merge_dicts(base, override):
    """Deep merge: dicts merge key by key, everything else (lists included) is replaced.

    A ``{type, kwargs}`` block whose ``type`` changes (another optimizer, scheduler, ...)
    replaces the base block whole, since the old ``kwargs`` belong to the old type;
    ``_delete_: true`` forces a replacement anywhere.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = dict(value)
            replace = value.pop("_delete_", False) or (
                "type" in value and "type" in out[key] and value["type"] != out[key]["type"]
                and ("kwargs" in value or "kwargs" in out[key]))
            out[key] = copy.deepcopy(value) if replace else merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_tree(path, _stack=(), origins=None):
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigError(f"_base_ cycle: {chain}")
    data = _read_yaml(path)
    resolve_paths(data, path.parent, str(path))
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged = {}
    for base in bases:
        base_path = Path(base)
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        if not base_path.is_file():
            raise ConfigError(f"{path}: _base_ file not found: {base} (looked at {base_path})")
        merged = merge_dicts(merged, _load_tree(base_path, (*_stack, path), origins))
    if origins is not None:
        _record_origins(data, str(path), origins)
    return merge_dicts(merged, data)


# ----------------------------------------------------------------------------- paths

def _schema_at(keys):
    """The schema node for a key path, or None when the path is free-form."""
    node = SCHEMA
    for key in keys:
        if isinstance(node, OptionalT):
            node = node.inner
        if isinstance(node, tuple):  # alternatives: follow the one that can hold this key
            want = ListOf if isinstance(key, int) else dict
            node = next((n for n in (m.inner if isinstance(m, OptionalT) else m for m in node)
                         if isinstance(n, want)), None)
        if isinstance(node, dict):
            node = node.get(key, node.get("*"))
        elif isinstance(node, ListOf):
            node = node.item
        else:
            return None
        if node is None:
            return None
    return node


def _is_path_key(keys):
    node = _schema_at(keys)
    if isinstance(node, OptionalT):
        node = node.inner
    if isinstance(node, tuple):
        node = next((n for n in node if isinstance(n, PathT) or
                     (isinstance(n, OptionalT) and isinstance(n.inner, PathT))), None)
        node = node.inner if isinstance(node, OptionalT) else node
    if isinstance(node, PathT):
        return True
    # net kwargs are free-form; by convention any key ending in _path/_dir/_file is a path
    return bool(keys) and isinstance(keys[-1], str) and keys[-1].endswith(
        ("_path", "_dir", "_file", "_root")) and "net" in keys


def resolve_paths(data, base_dir, source, _keys=()):
    """Make relative paths absolute against the folder of the file that wrote them (UniAD)."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(
        data, list) else []
    for key, value in list(items):
        keys = (*_keys, key)
        if isinstance(value, (dict, list)):
            resolve_paths(value, base_dir, source, keys)
        elif isinstance(value, str) and value and _is_path_key(keys):
            expanded = os.path.expanduser(value)
            if not os.path.isabs(expanded):
                expanded = str((Path(base_dir) / expanded).resolve())
            data[key] = expanded


# ----------------------------------------------------------------------------- overrides

def parse_override(text):
    if "=" not in text:
        raise ConfigError(f"--opts entry '{text}' must look like key.sub.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--opts entry '{text}' has an empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cfg, overrides, cwd=None, origins=None):
    """Set ``a.b.0.c=value`` entries; values are YAML-typed, list elements by index.

    ``origins`` (dotted key -> source), when given, records each key as set by ``--opts``.
    """
    for text in overrides or []:
        keys, value = parse_override(text)
        node = cfg
        trail = []
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            trail.append(key)
            where = ".".join(trail)
            if isinstance(node, list):
                if not key.lstrip("-").isdigit():
                    raise ConfigError(f"--opts {text}: '{where}' indexes a list; use an integer")
                idx = int(key)
                if not -len(node) <= idx < len(node):
                    raise ConfigError(f"--opts {text}: index {idx} out of range for "
                                      f"a list of {len(node)} at '{'.'.join(trail[:-1])}'")
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                else:
                    if key not in node or node[key] is None:
                        node[key] = {}
                    node = node[key]
            else:
                raise ConfigError(f"--opts {text}: '{'.'.join(trail[:-1])}' is a "
                                  f"{type(node).__name__}, not a mapping or list")
        if isinstance(value, str) and _is_path_key(tuple(int(k) if k.isdigit() else k
                                                         for k in keys)):
            if value and not os.path.isabs(os.path.expanduser(value)):
                _set(cfg, keys, str((Path(cwd or os.getcwd()) / value).resolve()))
        if origins is not None:
            _set_origin(origins, ".".join(keys), f"--opts {text}")
    return cfg


def _set(cfg, keys, value):
    node = cfg
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


# ----------------------------------------------------------------------------- entry point

def load_config(path, overrides=None, validate=True):
    """Load ``path`` with its bases and ``--opts`` overrides into a validated EasyDict."""
    path = Path(path)
    origins = {}
    tree = _load_tree(path, origins=origins)
    apply_overrides(tree, overrides, origins=origins)
    apply_defaults(tree)
    if validate:
        validate_config(tree, str(path), origins)
    cfg = EasyDict(tree)
    cfg["config_path"] = str(path.resolve())
    return cfg


def to_plain(obj):
    """EasyDict -> plain dicts/lists, for YAML dumps and checkpoints."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def save_config(cfg, path):
    """Write ``cfg`` atomically; the sha256 of the bytes written (a run records it, so that a
    later hand edit of its config.yaml is noticed)."""
    import hashlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = yaml.dump(to_plain(cfg), Dumper=ConfigDumper, sort_keys=False,
                     default_flow_style=None).encode("utf-8")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()
