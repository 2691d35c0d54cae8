"""YAML configs: ``_base_`` composition, ``--opts`` overrides, path resolution and validation.

A config is a tree of plain dicts/lists turned into an EasyDict at the end. Validation is
schema driven (``utils.config_schema``) so that a misspelled key fails before a long run starts,
with the closest valid key suggested.
"""
import copy
import difflib
import os
from pathlib import Path

import yaml
from easydict import EasyDict

from utils.config_schema import SCHEMA, Any, Choice, ListOf, OptionalT, PathT


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the file and key."""


# ----------------------------------------------------------------------------- loading

def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
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


def _load_tree(path, _stack=()):
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
        merged = merge_dicts(merged, _load_tree(base_path, (*_stack, path)))
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
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cfg, overrides, cwd=None):
    """Set ``a.b.0.c=value`` entries; values are YAML-typed, list elements by index."""
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


# ----------------------------------------------------------------------------- validation

def _type_name(spec):
    if isinstance(spec, type):
        return spec.__name__
    return repr(spec)


def _check(value, spec, where, errors):
    if spec is Any or spec is None:
        return
    if isinstance(spec, OptionalT):
        if value is None:
            return
        spec = spec.inner
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            errors.append(f"'{where}' must be a mapping, got {type(value).__name__} {value!r}")
            return
        for key, sub in value.items():
            child = f"{where}.{key}" if where else str(key)
            if key in spec:
                _check(sub, spec[key], child, errors)
            elif "*" in spec:
                _check(sub, spec["*"], child, errors)
            else:
                close = difflib.get_close_matches(str(key), [k for k in spec if k != "*"], n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                valid = ", ".join(sorted(k for k in spec if k != "*"))
                errors.append(f"unknown key '{child}'{hint} (valid here: {valid})")
        return
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            errors.append(f"'{where}' must be a list, got {type(value).__name__} {value!r}")
            return
        if spec.length is not None and len(value) != spec.length:
            errors.append(f"'{where}' must have {spec.length} elements, got {len(value)}")
        for i, item in enumerate(value):
            _check(item, spec.item, f"{where}.{i}", errors)
        return
    if isinstance(spec, Choice):
        if value not in spec.values:
            close = difflib.get_close_matches(str(value), [str(v) for v in spec.values], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            errors.append(f"'{where}' must be one of {list(spec.values)}, got {value!r}{hint}")
        return
    if isinstance(spec, PathT):
        if not isinstance(value, str):
            errors.append(f"'{where}' must be a path string, got {type(value).__name__}")
        elif spec.must_exist and not os.path.exists(value):
            errors.append(f"'{where}': file not found: {value}")
        return
    if isinstance(spec, tuple):
        if not any(_matches(value, s) for s in spec):
            names = " or ".join(_type_name(s) for s in spec)
            errors.append(f"'{where}' must be {names}, got {type(value).__name__} {value!r}")
        return
    if not _matches(value, spec):
        errors.append(f"'{where}' must be {_type_name(spec)}, got {type(value).__name__} "
                      f"{value!r}")


def _matches(value, spec):
    if spec is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(spec, type):
        return isinstance(value, spec)
    errors = []
    _check(value, spec, "", errors)
    return not errors


def validate_config(cfg, source="config"):
    errors = []
    _check(cfg, SCHEMA, "", errors)
    names = set()
    net = cfg.get("net")
    for i, entry in enumerate(net if isinstance(net, list) else []):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue  # the schema check has reported it
        if name in names:
            errors.append(f"'net.{i}.name': duplicate module name '{name}'")
        prev = entry.get("prev")
        if isinstance(prev, str) and prev not in names:
            known = ", ".join(sorted(names)) or "none before it"
            errors.append(f"'net.{i}.prev': '{prev}' names no earlier module (earlier: {known})")
        names.add(name)
    frozen = cfg.get("frozen_layers")
    for layer in frozen if isinstance(frozen, list) else []:
        if isinstance(layer, str) and layer not in names:
            errors.append(f"'frozen_layers': '{layer}' names no module in net "
                          f"({', '.join(sorted(names))})")
    if errors:
        raise ConfigError(f"invalid config {source}:\n  - " + "\n  - ".join(errors))
    return cfg


# ----------------------------------------------------------------------------- entry point

def load_config(path, overrides=None, validate=True):
    """Load ``path`` with its bases and ``--opts`` overrides into a validated EasyDict."""
    path = Path(path)
    tree = _load_tree(path)
    apply_overrides(tree, overrides)
    if validate:
        validate_config(tree, str(path))
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_plain(cfg), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
