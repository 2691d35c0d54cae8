"""How a trained model turns preprocessed images into anomaly maps: the way its evaluation did.

Evaluation may run the frozen prefix (the backbone) once in float32, keep its outputs in the
feature cache (float32, or float16 with ``trainer.feature_cache_dtype``), and run only the rest
under autocast (``trainer.amp``). Running the whole model under autocast instead gives other
scores (5e-3 relative in bf16, enough to flip verdicts at the stored thresholds), so the
checkpoint records how its evaluation ran (``state["inference"]``) and every consumer of a
checkpoint (``utils.detector``, ``tools/predict.py``) goes through :func:`anomaly_maps`.
"""
import torch

from utils.misc import amp_dtype_for

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def inference_settings(cfg, cached_prefix):
    """The ``inference`` entry a checkpoint stores: ``cached_prefix`` is the number of leading
    modules whose outputs evaluation read from the feature cache (0 when it ran the whole
    model on images)."""
    tr = cfg.get("trainer") or {}
    cache_dtype = "float16" if tr.get("feature_cache_dtype") == "float16" else "float32"
    return {"amp": tr.get("amp") or False, "prefix_modules": int(cached_prefix),
            "prefix_dtype": cache_dtype if cached_prefix else None}


def settings_of(state, cfg):
    """A checkpoint's settings; one saved before they were recorded ran the whole model under
    the config's autocast, as that code evaluated it without a cache."""
    found = state.get("inference") if isinstance(state, dict) else None
    return dict(found) if found else inference_settings(cfg, 0)


def describe(settings):
    """One line for sidecars, logs and protocols."""
    amp = settings.get("amp") or "off"
    n = settings.get("prefix_modules") or 0
    if not n:
        return f"whole model under autocast {amp}"
    return (f"first {n} module(s) in float32, kept as {settings.get('prefix_dtype')}, the rest "
            f"under autocast {amp}")


@torch.no_grad()
def anomaly_maps(model, images, settings, device):
    """(N, 3, H, W) preprocessed images -> (N, H, W) float32 maps on the CPU."""
    device = torch.device(device)
    amp = amp_dtype_for(settings.get("amp") or False, device)
    model.eval()
    x = images.to(device)
    n = int(settings.get("prefix_modules") or 0)
    if n:
        dtype = DTYPES[settings.get("prefix_dtype") or "float32"]
        # as utils.engine.feature_cache builds and stores the prefix outputs
        out = model.prefix_outputs(x, n)
        inputs = {k: v.to(dtype) for k, v in out.items()
                  if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == len(x)}
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            pred = model(inputs, start=n)["pred"]
    else:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            pred = model({"image": x})["pred"]
    return pred[:, 0].float().cpu().numpy()
