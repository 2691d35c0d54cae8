"""A trained run as a Python object: ``load_detector(RUN).predict(image)``.

    from dualmem.utils.detector import load_detector

    detector = load_detector("RUN")                  # a run folder or a checkpoint file
    result = detector.predict("bottle_000.png", class_name="bottle")
    result.score, result.is_anomalous, result.anomaly_map, result.mask

``load_detector`` opens the checkpoint without running code from it (weights only), rebuilds
the model from the config stored there with every weight from the checkpoint, and keeps the
thresholds the last evaluation stored. ``predict`` takes an image file, an RGB ``uint8`` array
(HxWx3, or HxW grey), a list of those, or an already preprocessed batch (a float tensor
(N, 3, H, W) or (3, H, W)); a single image gives a :class:`Prediction`, anything else a list.

One inference path: :meth:`Detector.results` runs the model as the run's evaluation did
(``dualmem.utils.inference.anomaly_maps``), reduces each map to an image score by the run's rule
(``dualmem.utils.metrics.image_score_from_map``) and decides by :meth:`Decider.judge`. This API,
``tools/predict.py`` (``dualmem.utils.prediction``) and the exporter's eager reference
(``dualmem.utils.export_parity``) all go through it.

Thresholds (:class:`Decider`): explicit ``threshold`` / ``pixel_threshold`` win; else the
image's class (``class_name``, or the checkpoint's only class); else the 'global' entry,
F1-optimal over all classes pooled.

Preprocessing: :func:`preprocess` is the one path from a file or array to the model's input,
used by this module, ``tools/predict.py`` and the runner of exported models
(``dualmem.utils.exported_model.run_exported``, re-exported here):
``dualmem.datasets.image_io.read_image`` ->
``dualmem.datasets.image_io.model_input`` (resize by the config's ``dataset.resize``, a config without
the key having been trained with ``cv2_linear``; then the checkpoint's pixel mean/std), the very
function the training dataset calls.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dualmem.utils.errors import UserError


# ----------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(run_or_checkpoint, checkpoint=None):
    """A checkpoint file itself, or ``RUN/checkpoints/<checkpoint or last.pth>`` for a run."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        found = path / "checkpoints" / (checkpoint or "last.pth")
        if not found.is_file():
            have = sorted(p.name for p in (path / "checkpoints").glob("*.pth")) \
                if (path / "checkpoints").is_dir() else []
            raise FileNotFoundError(f"{found} not found: {path} is not a run folder holding "
                                    f"that checkpoint (checkpoints there: "
                                    f"{', '.join(have) or 'none'})")
        return found
    if path.is_file():
        return path
    raise FileNotFoundError(f"no run folder or checkpoint at {path}")


def _accepts(factory, name):
    import inspect

    target = factory.__init__ if inspect.isclass(factory) else factory
    return name in inspect.signature(target).parameters


def offline_net(net_cfg):
    """The ``net:`` list with ``pretrained: false`` / no ``checkpoint_path`` wherever a module
    takes them: the checkpoint carries every weight."""
    from dualmem.models.registry import MODELS

    out = []
    for entry in net_cfg:
        entry = dict(entry)
        kwargs = dict(entry.get("kwargs") or {})
        factory = MODELS.get(entry["type"])
        if _accepts(factory, "pretrained"):
            kwargs["pretrained"] = False
        if "checkpoint_path" in kwargs:
            kwargs["checkpoint_path"] = None
        entry["kwargs"] = kwargs
        out.append(entry)
    return out


def load_model(checkpoint, device, trusted=False, plugins=(), expect_net=None):
    """(model in eval mode, config, checkpoint state) from a checkpoint file. The stored
    config builds only registered DualMem modules unless ``trusted`` or the module is one of
    ``plugins`` (see :mod:`models.registry`). A file that is not DualMem's, or (with
    ``expect_net``, a ``net:`` list) of another method, is refused in one line saying what it
    is and what was expected (``dualmem.utils.checkpoint_kind``)."""
    from easydict import EasyDict

    from dualmem.models import ModelHelper
    from dualmem.models.registry import everything_trusted, trust_plugins
    from dualmem.utils.checkpoint import CheckpointError, load_checkpoint
    from dualmem.utils.checkpoint_kind import (CheckpointKindError, describe, head_of, inspect_file,
                                       is_dualmem, method_mismatch, not_dualmem)

    trust_plugins(plugins)
    try:
        state = load_checkpoint(checkpoint, map_location="cpu", trusted=trusted)
    except CheckpointError:
        what = inspect_file(checkpoint, trusted)  # None: its own message says it best
        if what is None:
            raise
        raise not_dualmem(checkpoint, what) from None
    if not is_dualmem(state):
        raise not_dualmem(checkpoint, describe(state))
    mismatch = method_mismatch(checkpoint, state["config"]["net"], expect_net)
    if mismatch:
        raise CheckpointKindError(mismatch)
    cfg = EasyDict(state["config"])
    with everything_trusted(trusted):
        model = ModelHelper(offline_net(cfg.net), input_size=cfg.dataset.input_size,
                            frozen_layers=cfg.get("frozen_layers"))
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {checkpoint} ({head_of(cfg.net)[0]}) does not fit "
                              f"the model its own config builds (edited?): missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), cfg, state


# ----------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class InputSpec:
    """What turns an image into the model's input: size (h, w), colour order, resize method,
    normalisation."""
    input_size: tuple
    pixel_mean: tuple
    pixel_std: tuple
    color_mode: str = "RGB"
    resize: str = "cv2_linear"

    @classmethod
    def from_checkpoint(cls, cfg, state):
        from dualmem.utils.config_defaults import input_settings

        ds = cfg["dataset"]
        return cls(tuple(int(s) for s in ds["input_size"]),
                   tuple(float(v) for v in state["pixel_mean"]),
                   tuple(float(v) for v in state["pixel_std"]),
                   *input_settings(cfg))

    @classmethod
    def from_dict(cls, d):
        return cls(tuple(d["input_size"]), tuple(d["pixel_mean"]), tuple(d["pixel_std"]),
                   d.get("color_mode", "RGB"), d.get("resize", "cv2_linear"))

    def to_dict(self):
        return {"input_size": list(self.input_size), "pixel_mean": list(self.pixel_mean),
                "pixel_std": list(self.pixel_std), "color_mode": self.color_mode,
                "resize": self.resize}


def read_input(path, spec):
    """An image file as the array the model's preprocessing expects (``spec.color_mode``)."""
    from dualmem.datasets.image_io import read_image

    return read_image(path, spec.color_mode)


def preprocess(image, spec):
    """An image file or array -> the (3, H, W) float tensor the model takes: read, resize to
    ``spec.input_size`` by ``spec.resize``, scale to [0, 1] and normalise (as training)."""
    from dualmem.datasets.image_io import model_input

    if isinstance(image, (str, os.PathLike)):
        image = read_input(image, spec)
    return model_input(image, spec.input_size, spec.resize, spec.pixel_mean, spec.pixel_std)[0]


def is_image_array(x):
    """An HxW or HxWx(1|3) array: one image, not a list of them."""
    return isinstance(x, np.ndarray) and (x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (1, 3)))


def as_batch(images, spec):
    """(batch (N, 3, H, W), [original (h, w) or None per image], [source or None],
    single): files, arrays or lists of them are read and preprocessed; a tensor is taken as
    already preprocessed."""
    if torch.is_tensor(images):
        x = images.float()
        single = x.ndim == 3
        x = x.unsqueeze(0) if single else x
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != tuple(spec.input_size):
            raise UserError(f"a preprocessed batch must be (N, 3, {spec.input_size[0]}, "
                             f"{spec.input_size[1]}) or (3, H, W), got {tuple(images.shape)}")
        return x, [None] * len(x), [None] * len(x), single
    single = isinstance(images, (str, os.PathLike)) or is_image_array(images)
    items = [images] if single else list(images)
    if not items:
        raise UserError("no images given")
    tensors, sizes, sources = [], [], []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            sources.append(str(item))
            item = read_input(item, spec)
        elif is_image_array(item):
            sources.append(None)
        else:
            raise TypeError(f"an image is a file path or an HxWx3 / HxW uint8 array, got "
                            f"{type(item).__name__}")
        sizes.append(tuple(item.shape[:2]))
        tensors.append(preprocess(item, spec))
    return torch.stack(tensors), sizes, sources, single


# ----------------------------------------------------------------------------- thresholds
class Decider:
    """Picks the thresholds and normalisation ranges for an image's class: explicit values win,
    then the class's entry, else the 'global' one (pooled over all classes)."""

    def __init__(self, thresholds, threshold=None, pixel_threshold=None):
        self.per_class = (thresholds or {}).get("per_class") or {}
        self.pooled = (thresholds or {}).get("global") or {}
        self.threshold, self.pixel_threshold = threshold, pixel_threshold

    def entry(self, cls):
        if cls is not None and cls in self.per_class:
            return self.per_class[cls], "class"
        return self.pooled, "global"

    def __call__(self, cls):
        entry, source = self.entry(cls)
        image_t = entry.get("image_threshold") if self.threshold is None else self.threshold
        pixel_t = entry.get("pixel_threshold") if self.pixel_threshold is None else \
            self.pixel_threshold
        if self.threshold is not None:
            source = "explicit"
        return entry, source, image_t, pixel_t

    def judge(self, score, anomaly_map, cls, source=None):
        """The one decision step: an image score and its map -> a :class:`Prediction` by the
        thresholds of ``cls`` (``score >= image threshold``, ``map >= pixel threshold``)."""
        from dualmem.utils.evaluator import normalized_score

        entry, how, image_t, pixel_t = self(cls)
        rule = entry.get("image_rule") or entry.get("image_threshold_source")
        if how != "explicit" and rule:  # e.g. 'class:good_fpr(1%, 40 held-out goods)'
            how = f"{how}:{rule}"
        return Prediction(
            score=float(score),
            is_anomalous=None if image_t is None else bool(score >= image_t),
            anomaly_map=anomaly_map,
            mask=None if pixel_t is None else anomaly_map >= pixel_t,
            normalized_score=normalized_score(score, entry, image_t),
            class_name=cls, threshold_from=how, image_threshold=image_t,
            pixel_threshold=pixel_t, source=source,
            map_range=(entry.get("map_min"), entry.get("map_max")))


@dataclass
class Prediction:
    """One image's result. ``anomaly_map`` (float32) and ``mask`` (bool, ``map >= pixel
    threshold``; None without one) are at the image's own size for files and arrays, at the
    model's input size for preprocessed tensors. ``is_anomalous``: ``score >= image
    threshold`` (None without one); ``normalized_score`` puts that threshold at 0.5.
    ``map_range``: (min, max) of the evaluation's maps for the class (heat-map colouring)."""
    score: float
    is_anomalous: object
    anomaly_map: np.ndarray
    mask: object
    normalized_score: object
    class_name: object
    threshold_from: str
    image_threshold: object
    pixel_threshold: object
    source: object = None
    map_range: tuple = (None, None)


# ----------------------------------------------------------------------------- detector
class Detector:
    """A checkpoint's model, preprocessing, image-score rule and thresholds."""

    def __init__(self, model, cfg, state, device, checkpoint=None, threshold=None,
                 pixel_threshold=None, inference=None):
        """``inference``: how to run the model (``dualmem.utils.inference`` settings); default: as
        the checkpoint's evaluation ran it. ``dualmem.utils.inference.FLOAT32`` is the exporter's."""
        from dualmem.utils.evaluator import evaluator_settings
        from dualmem.utils.inference import settings_of

        self.model, self.cfg, self.device = model, cfg, device
        self.checkpoint = checkpoint
        self.classes = list(state.get("classes") or [])
        self.thresholds = state.get("thresholds")
        self.epoch = state.get("epoch")
        self.spec = InputSpec.from_checkpoint(cfg, state)
        self.score_cfg = dict(evaluator_settings(cfg)[1])
        self.threshold, self.pixel_threshold = threshold, pixel_threshold
        self.inference = dict(inference) if inference is not None else \
            settings_of(state, cfg)  # how its evaluation ran the model

    def __repr__(self):
        return (f"Detector({self.checkpoint}, classes={self.classes}, "
                f"input_size={list(self.spec.input_size)}, image_score={self.score_cfg})")

    def class_for(self, class_name=None):
        """The class whose thresholds apply: the argument, else the only class, else None."""
        if class_name is not None:
            per_class = (self.thresholds or {}).get("per_class") or {}
            if self.thresholds and class_name not in per_class:
                raise UserError(f"class '{class_name}' has no thresholds in {self.checkpoint} "
                                 f"(classes there: {', '.join(per_class)})")
            return class_name
        return self.classes[0] if len(self.classes) == 1 else None

    def anomaly_maps(self, batch):
        """(N, 3, H, W) preprocessed -> (N, H, W) float32 maps, as the run's evaluation
        computed them (cached prefix, feature-cache dtype and ``trainer.amp`` included)."""
        from dualmem.utils.inference import anomaly_maps

        return anomaly_maps(self.model, batch, self.inference, self.device)

    def scores(self, maps):
        """Image scores from (N, H, W) maps by the run's rule (``evaluator.image_score``)."""
        from dualmem.utils.metrics import image_score_from_map

        return image_score_from_map(maps, **self.score_cfg)

    def results(self, batch, classes, sizes=None, sources=None, threshold=None,
                pixel_threshold=None):
        """Run the model, reduce to image scores, decide: a preprocessed (N, 3, H, W) batch ->
        one :class:`Prediction` per image, judged by the thresholds of ``classes[i]``, its map
        resized to ``sizes[i]`` (h, w) where one is given (bilinear)."""
        import cv2

        threshold = self.threshold if threshold is None else threshold
        pixel_threshold = self.pixel_threshold if pixel_threshold is None else pixel_threshold
        decide = Decider(self.thresholds, threshold, pixel_threshold)
        maps = self.anomaly_maps(batch)
        out = []
        for i, (amap, score) in enumerate(zip(maps, self.scores(maps))):
            hw = sizes[i] if sizes else None
            if hw is not None and tuple(hw) != amap.shape:
                amap = cv2.resize(amap, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
            out.append(decide.judge(score, amap, classes[i], sources[i] if sources else None))
        return out

    def predict(self, images, class_name=None, threshold=None, pixel_threshold=None,
                batch_size=8):
        """Score, anomaly map, mask and verdict for one image (a :class:`Prediction`) or for a
        list / batch (a list of them); see the module doc for what ``images`` may be."""
        cls = self.class_for(class_name)
        out, single = [], False
        chunks = [images] if torch.is_tensor(images) or isinstance(images, (str, os.PathLike)) \
            or is_image_array(images) else \
            [list(images)[i:i + batch_size] for i in range(0, len(images), batch_size)]
        for chunk in chunks:
            batch, sizes, sources, single = as_batch(chunk, self.spec)
            out += self.results(batch, [cls] * len(batch), sizes, sources, threshold,
                                pixel_threshold)
        return out[0] if single and len(out) == 1 else out


def load_detector(run_or_checkpoint, checkpoint=None, device="cpu", trusted=False,
                  threshold=None, pixel_threshold=None, plugins=()):
    """A :class:`Detector` from a run folder (``checkpoints/last.pth``, or ``checkpoint``:
    e.g. 'best.pth') or a checkpoint file. ``trusted`` opens a checkpoint that holds more
    than tensors and plain data (only for a source you trust)."""
    from dualmem.utils.misc import resolve_device

    path = resolve_checkpoint(run_or_checkpoint, checkpoint)
    device = resolve_device(device)
    model, cfg, state = load_model(path, device, trusted=trusted, plugins=plugins)
    return Detector(model, cfg, state, device, checkpoint=path, threshold=threshold,
                    pixel_threshold=pixel_threshold)


# exported models: the runner lives in utils.exported_model (README and older code import it here)
from dualmem.utils.exported_model import ExportedModel, run_exported, sidecar_path  # noqa: E402,F401
