"""Checking a config against the schema (utils/config_schema.py), with each problem naming the
key and the file or ``--opts`` entry that set it."""
import difflib
import os

from utils.config_schema import SCHEMA, Any, Choice, ListOf, Number, OptionalT, PathT
from utils.errors import UserError


class ConfigError(UserError):
    """A config problem the user must fix; the message names the file and key."""


def _record_origins(data, source, origins, _prefix=""):
    """Note in ``origins`` (dotted key -> source) that ``source`` set every key in ``data``."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(
        data, list) else []
    for key, value in items:
        where = f"{_prefix}.{key}" if _prefix else str(key)
        origins[where] = source
        _record_origins(value, source, origins, where)


def _set_origin(origins, where, source):
    """``where`` (and everything below it, replaced with it) now comes from ``source``."""
    below = where + "."
    for key in [k for k in origins if k.startswith(below)]:
        del origins[key]
    origins[where] = source


def origin_of(origins, where, default=None):
    """The source of the value at dotted key ``where``: its own entry or its nearest parent's."""
    while where:
        if where in origins:
            return origins[where]
        where = where.rpartition(".")[0]
    return default


def _type_name(spec):
    if spec is Number:
        return "a number"
    if isinstance(spec, type):
        return spec.__name__
    return repr(spec)


def _check(value, spec, where, errors):
    """Append ``(dotted key, message)`` to ``errors`` for each way ``value`` breaks ``spec``."""
    if spec is Any or spec is None:
        return
    if isinstance(spec, OptionalT):
        if value is None:
            return
        spec = spec.inner
    got = f"got {type(value).__name__} {value!r}"
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            errors.append((where, f"'{where}' must be a mapping, {got}"))
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
                errors.append((child, f"unknown key '{child}'{hint} (valid here: {valid})"))
        return
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            errors.append((where, f"'{where}' must be a list, {got}"))
            return
        if spec.length is not None and len(value) != spec.length:
            errors.append((where, f"'{where}' must have {spec.length} elements, got {len(value)}"))
        for i, item in enumerate(value):
            _check(item, spec.item, f"{where}.{i}", errors)
        return
    if isinstance(spec, Choice):
        if value not in spec.values:
            close = difflib.get_close_matches(str(value), [str(v) for v in spec.values], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            errors.append((where, f"'{where}' must be one of {list(spec.values)}, got "
                                  f"{value!r}{hint}"))
        return
    if isinstance(spec, PathT):
        if not isinstance(value, str):
            errors.append((where, f"'{where}' must be a path string, got {type(value).__name__}"))
        elif spec.must_exist and not os.path.exists(value):
            errors.append((where, f"'{where}': file not found: {value}"))
        return
    if spec is Number or not isinstance(spec, tuple):
        if not _matches(value, spec):
            errors.append((where, f"'{where}' must be {_type_name(spec)}, {got}"))
        return
    if not any(_matches(value, s) for s in spec):
        names = " or ".join(_type_name(s) for s in spec)
        errors.append((where, f"'{where}' must be {names}, {got}"))


def _matches(value, spec):
    if spec is float or spec is Number:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(spec, type):
        return isinstance(value, spec)
    errors = []
    _check(value, spec, "", errors)
    return not errors


def validate_config(cfg, source="config", origins=None):
    """Check ``cfg`` against the schema; raise :class:`ConfigError` listing every problem.

    ``origins`` (dotted key -> source, as :func:`load_config` collects it) lets each problem
    name the file or ``--opts`` entry that set the key; without it, ``source`` is named.
    """
    errors = []
    _check(cfg, SCHEMA, "", errors)
    names = set()
    net = cfg.get("net")
    for i, entry in enumerate(net if isinstance(net, list) else []):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue  # the schema check has reported it
        if name in names:
            errors.append((f"net.{i}.name", f"'net.{i}.name': duplicate module name '{name}'"))
        prev = entry.get("prev")
        if isinstance(prev, str) and prev not in names:
            known = ", ".join(sorted(names)) or "none before it"
            errors.append((f"net.{i}.prev", f"'net.{i}.prev': '{prev}' names no earlier module "
                                            f"(earlier: {known})"))
        names.add(name)
    frozen = cfg.get("frozen_layers")
    for layer in frozen if isinstance(frozen, list) else []:
        if isinstance(layer, str) and layer not in names:
            errors.append(("frozen_layers", f"'frozen_layers': '{layer}' names no module in net "
                                            f"({', '.join(sorted(names))})"))
    if errors:
        lines = []
        for where, message in errors:
            origin = origin_of(origins, where, source) if origins else source
            lines.append(f"{message} (from {origin})")
        raise ConfigError(f"invalid config {source}:\n  - " + "\n  - ".join(lines))
    return cfg
