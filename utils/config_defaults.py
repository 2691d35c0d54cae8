"""One source of defaults: the value of every setting a config may leave out.

``load_config`` fills these in (a config's own value always wins), and so does the Trainer for
a config built in code, so the code reads settings without fallbacks of its own and the
resolved ``config.yaml`` of a run shows every value it used. ``configs/runtime.yaml`` shows the
same values (a test keeps the two equal, both ways). Two settings are resolved elsewhere, each
in one function: ``dataset.resize`` and the colour order by :func:`input_settings` (a config
without ``resize`` predates the key), the evaluator's metrics, key metric and image score by
``utils.evaluator.evaluator_settings`` (UniAD's metric lists imply the image score).
"""
import copy
from collections import namedtuple

DEFAULTS = {
    "random_seed": 133,
    "deterministic": False,
    "dataset": {
        "type": "explicit",
        "image_reader": {"type": "opencv", "kwargs": {"color_mode": "RGB"}},
        "train": {"hflip": False, "vflip": False, "rotate": False},
        "test": {},
        "input_size": [224, 224],
        "pixel_mean": None,
        "pixel_std": None,
        "batch_size": 8,
        "workers": 2,
        "validate": True,
        "on_bad_file": "error",
        "check_files": True,
    },
    "criterion": [{"name": "FeatureMSELoss", "type": "FeatureMSELoss", "kwargs": {"weight": 1.0}}],
    "trainer": {
        "max_epoch": 1000,
        "clip_max_norm": 0.1,
        "val_freq_epoch": 10,
        "print_freq_step": 10,
        "amp": False,
        "on_nonfinite": "stop",
        "max_nonfinite_steps": 20,
        "feature_cache": "auto",
        "feature_cache_dtype": "float32",
        "feature_cache_dir": None,
        "channels_last": False,
        "compile": False,
        "find_unused_parameters": False,
        "optimizer": {"type": "AdamW",
                      "kwargs": {"lr": 0.0001, "betas": [0.9, 0.999], "weight_decay": 0.0001}},
        "lr_scheduler": {"type": "StepLR", "kwargs": {"step_size": 800, "gamma": 0.1}},
    },
    "evaluator": {
        # decision thresholds (utils/thresholds.py): f1 on the test set for classes with
        # masks, else from held-out good images at a false-reject rate (datasets/holdout.py)
        "thresholds": {"image_rule": "auto", "false_reject_rate": 0.01, "pixel_rule": "auto",
                       "pixel_rate": 0.001, "holdout": 0.1, "holdout_min": 20},
    },
}

# torch classes built from {type, kwargs}: the kwargs are the constructor's arguments, so a
# block a config gives is kept as given (torch's own defaults for the kwargs it leaves out;
# null lr_scheduler: no schedule), a block without a type is of the default's type, and only a
# config without the block gets the default whole
TYPED = ("trainer.optimizer", "trainer.lr_scheduler")

# UniAD keys accepted so its configs load, but nothing here reads them
UNUSED_UNIAD_KEYS = ("port", "saver", "trainer.tb_freq_step", "evaluator.save_dir",
                     "evaluator.vis_compound", "evaluator.vis_single", "evaluator.eval_dir")


def apply_defaults(tree, defaults=DEFAULTS, _prefix=""):
    """Fill the keys ``tree`` leaves out (in place; nested dicts merged, a section set to null
    filled as an empty one, the :data:`TYPED` blocks as said there)."""
    for key, value in defaults.items():
        where = _prefix + key
        if where in TYPED:
            if key not in tree:
                tree[key] = copy.deepcopy(value)
            elif isinstance(tree[key], dict) and tree[key].get("type") is None:
                tree[key]["type"] = value["type"]
        elif isinstance(value, dict):
            if not isinstance(tree.get(key), dict):
                if tree.get(key) is not None:
                    continue  # a wrong type: validation names it
                tree[key] = {}
            apply_defaults(tree[key], value, where + ".")
        elif key not in tree:
            tree[key] = copy.deepcopy(value)
    return tree


InputSettings = namedtuple("InputSettings", "color_mode resize")


def input_settings(cfg):
    """How a config's images are read and sized, for a config as loaded, a run's or a
    checkpoint's (whatever its age): ``color_mode`` (``dataset.image_reader.kwargs``; left out
    in a config saved before it was a default: ``DEFAULTS``' RGB) and ``resize``. The rule for
    ``resize`` lives here alone: a config without ``dataset.resize`` was trained before the key
    existed, with OpenCV's resize (``cv2_linear``, datasets/image_io.py), so that is what it
    means; new configs get ``antialias`` from configs/runtime.yaml."""
    from dualmem.datasets.image_io import LEGACY_RESIZE, check_resize

    ds = cfg.get("dataset") or {}
    kwargs = (ds.get("image_reader") or {}).get("kwargs") or {}
    default = DEFAULTS["dataset"]["image_reader"]["kwargs"]["color_mode"]
    return InputSettings(kwargs.get("color_mode", default),
                         check_resize(ds.get("resize", LEGACY_RESIZE)))


def unused_keys(tree):
    """The UniAD keys present in ``tree`` that nothing reads (for a one-line warning)."""
    found = []
    for dotted in UNUSED_UNIAD_KEYS:
        node = tree
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            found.append(dotted)
    return found
