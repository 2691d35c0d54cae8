"""Builds the ``net:`` list into one module that runs UniAD's dict pipeline.

Each entry is ``{name, type, prev, frozen, kwargs}``. ``prev`` hands the earlier module's
``get_outplanes()/get_outstrides()`` over as ``inplanes/instrides``; ``feature_size`` is derived
from the input size for heads that need it. Frozen modules stay in eval mode with no gradients.
"""
import difflib
import inspect

import torch
import torch.nn as nn

from dualmem.models.registry import MODELS
from dualmem.utils.errors import UserError


class NetBuildError(UserError):
    pass


def _kwarg_specs():
    """What a net kwarg of each of these names must hold, in every module that takes it.

    The nested dicts list the keys their one consumer reads (``feature_jitter``:
    ``add_feature_jitter`` in models/reconstructions/uniad.py; ``neighbor_mask``: ``Transformer``
    in models/reconstructions/transformer.py; ``initializer``: ``initialize_from_cfg`` in
    models/initializer.py), so a misspelled key there is refused instead of silently falling
    back to the default. The sizes are those of the transformer family, which would otherwise
    fail with a traceback once the model is built.
    """
    from dualmem.utils.config_schema import Fraction, Int, ListOf, Num, OptionalT, Positive

    return {
        "feature_jitter": OptionalT({"scale": Num(ge=0), "prob": Fraction}),
        "neighbor_mask": OptionalT({"neighbor_size": ListOf(Positive, length=2),
                                    "mask": ListOf(bool, length=3)}),
        "initializer": OptionalT((str, {"method": str, "std": Num(gt=0)})),
        "hidden_dim": Positive, "nhead": Positive, "num_encoder_layers": Int(ge=0),
        "num_decoder_layers": Positive, "dim_feedforward": Positive,
        "dropout": Num(ge=0, lt=1),
        "outstrides": ListOf(Positive),  # the divisor of the input size (MFCN)
    }


def net_kwarg_problems(net_cfg):
    """``[(dotted key, message)]`` for net kwargs a module would misread: the declared nested
    keys and ranges (:func:`_kwarg_specs`). Run by config validation, so the run stops before
    any model, data or folder is made; an unknown kwarg name or a ``type`` that does not
    resolve is left to the build (also before any folder), which names it."""
    from dualmem.utils.config_validation import check_spec

    specs = _kwarg_specs()
    problems = []
    for index, entry in enumerate(net_cfg):
        try:
            factory = MODELS.get(entry.get("type"))
        except (KeyError, UserError, ImportError):
            continue
        names, _ = _accepted(factory)
        kwargs = entry.get("kwargs") or {}
        for key, value in kwargs.items():  # an unknown name is refused by the build
            if key in specs and key in names:
                problems.extend(check_spec(value, specs[key], f"net.{index}.kwargs.{key}"))
        if "nhead" in names and "hidden_dim" in names:
            sizes = _with_defaults(factory, kwargs, ("hidden_dim", "nhead"))
            if all(isinstance(v, int) and v > 0 for v in sizes):
                if sizes[0] % sizes[1]:
                    problems.append((f"net.{index}.kwargs.nhead",
                                     f"'net.{index}.kwargs.nhead' {sizes[1]} does not divide "
                                     f"hidden_dim {sizes[0]}"))
    return problems


def _with_defaults(factory, kwargs, keys):
    params = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory).parameters
    return [kwargs.get(k, params[k].default) for k in keys]


def _unknown_kwarg(key, names):
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown kwarg '{key}'{hint} (accepted: {', '.join(names)})"


def _accepted(fn):
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = inspect.signature(target).parameters
    names = [p for p in params if p != "self"]
    var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    return names, var_kw


def build_module(entry, context, index):
    type_name = entry.get("type")
    name = entry.get("name", f"net.{index}")
    try:
        factory = MODELS.get(type_name)
    except KeyError as exc:
        raise NetBuildError(f"net.{index} ('{name}'): {exc.args[0]}") from None
    kwargs = dict(entry.get("kwargs") or {})
    names, var_kw = _accepted(factory)
    for key, value in context.items():
        if key in names and key not in kwargs:
            kwargs[key] = value
    if not var_kw:
        for key in kwargs:
            if key not in names:
                raise NetBuildError(f"net.{index} ('{name}', {type_name}): "
                                    f"{_unknown_kwarg(key, names)}")
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise NetBuildError(f"net.{index} ('{name}', {type_name}): {exc}") from None


class ModelHelper(nn.Module):
    """The whole network: modules in order, each adding keys to the shared input dict."""

    def __init__(self, net_cfg, input_size=None, frozen_layers=()):
        super().__init__()
        if not net_cfg:
            raise NetBuildError("'net' lists no module: a config needs at least a backbone")
        self.module_names = []
        self.frozen = set(frozen_layers or ())
        built = {}
        for i, entry in enumerate(net_cfg):
            context = {}
            prev = entry.get("prev")
            if prev is not None:
                if prev not in built:
                    raise NetBuildError(f"net.{i} ('{entry.get('name')}'): prev '{prev}' names "
                                        f"no earlier module ({', '.join(built) or 'none'})")
                context["inplanes"] = list(built[prev].get_outplanes())
                context["instrides"] = list(built[prev].get_outstrides())
                if input_size is not None:
                    stride = context["instrides"][0]
                    if input_size[0] % stride or input_size[1] % stride:
                        raise NetBuildError(
                            f"dataset.input_size {list(input_size)} is not divisible by the "
                            f"stride {stride} of '{prev}' feeding net.{i} ('{entry.get('name')}')")
                    context["feature_size"] = [input_size[0] // stride, input_size[1] // stride]
            if input_size is not None:
                context["input_size"] = list(input_size)
            module = build_module(entry, context, i)
            name = entry["name"]
            built[name] = module
            self.add_module(name, module)
            self.module_names.append(name)
            if entry.get("frozen"):
                self.frozen.add(name)
        for name in self.frozen:
            for p in getattr(self, name).parameters():
                p.requires_grad_(False)
        # leading modules with nothing to learn (frozen, or parameter-free like MFCN) need no
        # autograd graph, and their outputs can be cached when their input is deterministic
        self.frozen_prefix = []
        for name in self.module_names:
            module = getattr(self, name)
            if name not in self.frozen and any(p.requires_grad for p in module.parameters()):
                break
            self.frozen_prefix.append(name)
        self.no_grad_prefix = set(self.frozen_prefix)
        self.train()

    def train(self, mode=True):
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    @property
    def pixel_mean(self):
        return getattr(getattr(self, self.module_names[0]), "pixel_mean", None)

    @property
    def pixel_std(self):
        return getattr(getattr(self, self.module_names[0]), "pixel_std", None)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, input, start=0, stop=None):
        """Modules ``start`` to ``stop`` (exclusive) of the net: ``start`` skips the first ones,
        whose outputs ``input`` already holds (feature cache)."""
        data = dict(input)
        for name in self.module_names[start:stop]:
            if name in self.no_grad_prefix:
                with torch.no_grad():
                    data.update(getattr(self, name)(data))
            else:
                data.update(getattr(self, name)(data))
        return data

    @torch.no_grad()
    def prefix_outputs(self, images, stop):
        """What module ``stop - 1`` returns when the first ``stop`` modules run on ``images``:
        the one way to run a frozen prefix (the feature cache, memory banks, benchmarks)."""
        modules = [getattr(self, n) for n in self.module_names[:stop]]
        modes = [m.training for m in modules]
        for m in modules:  # features as at test time, whatever mode the model is in
            m.eval()
        try:
            data = self.forward({"image": images}, stop=stop - 1)
            return modules[-1](data)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
