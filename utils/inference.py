"""How a trained model turns preprocessed images into anomaly maps: the way its evaluation did.

Evaluation may run the frozen prefix (the backbone) once in float32, keep its outputs in the
feature cache (float32, or float16 with ``trainer.feature_cache_dtype``), and run only the rest
under autocast (``trainer.amp``). Running the whole model under autocast instead gives other
scores (5e-3 relative in bf16, enough to flip verdicts at the stored thresholds), so the
checkpoint records how its evaluation ran (``state["inference"]``) and every consumer of a
checkpoint (``utils.detector.Detector``, and through it ``tools/predict.py`` and the exporter's
reference) goes through :func:`anomaly_maps`. :func:`forward_maps` is the one step from a
model's output to a map: evaluation (``utils.evaluator.run_inference``, on images or cached
features) and :func:`anomaly_maps` both call it, so autocast and the map's dtype cannot drift.
"""
import torch

from dualmem.utils.misc import amp_dtype_for

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# the whole model on images in float32: what an exported graph computes (its parity reference)
FLOAT32 = {"amp": False, "prefix_modules": 0, "prefix_dtype": None}


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


def forward_maps(net, inputs, amp_dtype, device):
    """``net(inputs)["pred"]`` under autocast ``amp_dtype`` (None: off) -> channel 0 as
    (N, H, W) float32 maps, on ``device``. ``inputs`` holds images or cached prefix outputs."""
    enabled = amp_dtype is not None
    with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=enabled):
        pred = net(inputs)["pred"]
    return pred[:, 0].float()


@torch.no_grad()
def anomaly_maps(model, images, settings, device):
    """(N, 3, H, W) preprocessed images -> (N, H, W) float32 maps on the CPU."""
    device = torch.device(device)
    amp = amp_dtype_for(settings.get("amp") or False, device)
    model.eval()
    x = images.to(device)
    n = int(settings.get("prefix_modules") or 0)
    if not n:
        return forward_maps(model, {"image": x}, amp, device).cpu().numpy()
    dtype = DTYPES[settings.get("prefix_dtype") or "float32"]
    # as utils.engine.feature_cache builds, stores (in dtype) and reads back (float32) the
    # prefix outputs
    out = model.prefix_outputs(x, n)
    inputs = {k: v.to(dtype).float() for k, v in out.items()
              if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == len(x)}
    return forward_maps(lambda d: model(d, start=n), inputs, amp, device).cpu().numpy()
