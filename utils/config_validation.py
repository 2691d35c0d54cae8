"""Checking a config against the schema (utils/config_schema.py), with each problem naming the
key and the file or ``--opts`` entry that set it."""
import difflib
import math
import os

from dualmem.utils.config_schema import SCHEMA, Any, Bounded, Choice, ListOf, Number, OptionalT, PathT
from dualmem.utils.errors import UserError


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
        return "a finite number"
    if isinstance(spec, type):
        return spec.__name__
    if isinstance(spec, dict):
        return f"a mapping of {', '.join(k for k in spec if k != '*')}"
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
        if isinstance(spec.item, (Bounded, type)):  # one line for the list, not one per item
            if not all(_matches(item, spec.item) for item in value):
                errors.append((where, f"'{where}': each element must be "
                                      f"{_type_name(spec.item)}, got {value!r}"))
            return
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
    if isinstance(spec, Bounded):
        problem = spec.problem(value)
        if problem:
            errors.append((where, f"'{where}' {problem}"))
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
    shaped = [s for s in spec if isinstance(s, dict)] if isinstance(value, dict) else \
        [s for s in spec if isinstance(s, ListOf)] if isinstance(value, list) else []
    if len(shaped) == 1:  # the one alternative of its shape: name the key inside it that fails
        _check(value, shaped[0], where, errors)
        return
    if not any(_matches(value, s) for s in spec):
        names = " or ".join(_type_name(s) for s in spec)
        errors.append((where, f"'{where}' must be {names}, {got}"))


def _matches(value, spec):
    if spec is float or spec is Number:  # nan/inf (".nan", ".inf" in YAML) are no setting
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (
            isinstance(value, int) or math.isfinite(value))
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(spec, type):
        return isinstance(value, spec)
    errors = []
    _check(value, spec, "", errors)
    return not errors


def check_spec(value, spec, where):
    """``[(dotted key, message)]``: how ``value`` at ``where`` breaks ``spec`` (a schema node),
    for checks that live beside the code they protect (the net kwargs of models/)."""
    errors = []
    _check(value, spec, where, errors)
    return errors


# filled in by the engine's build_scheduler from the run's length when the config leaves it out
SCHEDULER_DEFAULTS = {"CosineAnnealingLR": ("T_max",), "cosine": ("T_max",)}


def optim_classes():
    """``(optimizers, schedulers)``: the torch classes a config's ``trainer.optimizer`` and
    ``trainer.lr_scheduler`` may name. The one table, here so that validation can check it
    (torch imported only when asked); the engine builds from it."""
    import torch

    sched = torch.optim.lr_scheduler
    return ({"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD},
            {"StepLR": sched.StepLR, "MultiStepLR": sched.MultiStepLR,
             "CosineAnnealingLR": sched.CosineAnnealingLR, "cosine": sched.CosineAnnealingLR})


def _keywords(cls):
    """(accepted, required) keyword names of a torch optimizer/scheduler, past its first
    argument (the parameters or the optimizer, which the engine passes)."""
    import inspect

    params = [p for p in list(inspect.signature(cls.__init__).parameters.values())[2:]
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return [p.name for p in params], [p.name for p in params if p.default is p.empty]


def _unknown(key, valid):
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def optim_problems(trainer_cfg):
    """``[(dotted key, message)]`` for an optimizer or scheduler the run could not build: an
    unknown type, a keyword its constructor does not take (``T_maxx``) or one it needs. Found
    by validation, they stop a run before its folder exists instead of at epoch 0."""
    problems = []
    for section, table in zip(("optimizer", "lr_scheduler"), optim_classes()):
        block = trainer_cfg.get(section)
        if not isinstance(block, dict):
            continue
        where = f"trainer.{section}"
        kind = block.get("type", "AdamW" if section == "optimizer" else None)
        if kind not in table:
            problems.append((f"{where}.type", f"'{where}.type' must be one of {list(table)}, "
                                              f"got {kind!r}{_unknown(kind, table)}"))
            continue
        accepted, required = _keywords(table[kind])
        kwargs = block.get("kwargs") or {}
        problems += [(f"{where}.kwargs.{key}", f"unknown key '{where}.kwargs.{key}' for {kind}"
                                               f"{_unknown(key, accepted)} (it takes: "
                                               f"{', '.join(accepted)})")
                     for key in kwargs if key not in accepted]
        missing = [k for k in required if k not in kwargs and
                   k not in SCHEDULER_DEFAULTS.get(kind, ())]
        if missing:
            problems.append((f"{where}.kwargs", f"'{where}.kwargs': {kind} needs "
                                                f"{', '.join(missing)}"))
    return problems


def _code_checks(cfg, errors):
    """What the schema cannot say alone: each optimizer/scheduler type's keywords and each net
    module's kwargs, checked against the code that takes them, before any work starts. Once
    the schema found a problem these are skipped (they assume well-formed sections)."""
    from dualmem.models.model_builder import net_kwarg_problems

    errors.extend(optim_problems(cfg.get("trainer") or {}))
    errors.extend(net_kwarg_problems(cfg.get("net") or []))


def validate_config(cfg, source="config", origins=None):
    """Check ``cfg`` against the schema; raise :class:`ConfigError` listing every problem.

    ``origins`` (dotted key -> source, as :func:`load_config` collects it) lets each problem
    name the file or ``--opts`` entry that set the key; without it, ``source`` is named.
    """
    errors = []
    _check(cfg, SCHEMA, "", errors)
    if not errors:
        _code_checks(cfg, errors)
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
    thresholds = (cfg.get("evaluator") or {}).get("thresholds") if isinstance(
        cfg.get("evaluator"), dict) else None
    if isinstance(thresholds, dict) and "normal_percentile" in thresholds:
        q = thresholds["normal_percentile"]
        rate = f"{1 - q / 100:g}" if isinstance(q, (int, float)) and 0 < q < 100 else "r"
        errors.append(("evaluator.thresholds.normal_percentile",
                       f"'evaluator.thresholds.normal_percentile' ({q!r}) was folded into the "
                       f"good-image rule: write 'evaluator.thresholds.false_reject_rate: {rate}' "
                       f"(a share in (0, 1); image_rule good_fpr, or auto without masks)"))
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
        if len(lines) == 1:  # the one problem on the error line itself
            raise ConfigError(f"invalid config {source}: {lines[0]}")
        raise ConfigError(f"invalid config {source}:\n  - " + "\n  - ".join(lines))
    return cfg
