"""The keys a DualMem config may hold, with their types.

UniAD's own keys are accepted (so its configs load), plus DualMem's additions. ``"*"`` marks a
mapping with free keys. ``net[*].kwargs`` is checked later against the module's constructor.
"""
import math

from dualmem.datasets.prepare import SOURCES


class _AnyT:
    def __repr__(self):
        return "any"


Any = _AnyT()


class OptionalT:
    def __init__(self, inner):
        self.inner = inner

    def __repr__(self):
        return f"null or {self.inner!r}"


class ListOf:
    def __init__(self, item, length=None):
        self.item = item
        self.length = length

    def __repr__(self):
        return f"list of {getattr(self.item, '__name__', self.item)!r}"


class Choice:
    def __init__(self, *values):
        self.values = values

    def __repr__(self):
        return f"one of {list(self.values)}"


class Bounded:
    """A number within bounds (``integer``: an int), for values whose wrong sign or zero would
    otherwise pass and fail only once the run is under way (an epoch count, a batch size)."""

    def __init__(self, integer=False, ge=None, gt=None, le=None, lt=None):
        self.integer, self.ge, self.gt, self.le, self.lt = integer, ge, gt, le, lt

    def problem(self, value):
        """What is wrong with ``value``, or None."""
        kinds = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"must be {'int' if self.integer else 'a number'}, got " \
                   f"{type(value).__name__} {value!r}"
        if isinstance(value, float) and not math.isfinite(value):  # inf passes any ge/gt
            return f"must be a finite number, got {value!r}"
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt) and
              (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        return None if ok else f"must be {self!r}, got {value!r}"

    def __repr__(self):
        bounds = [f"{op} {v}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le),
                                            ("<", self.lt)) if v is not None]
        return ("an integer" if self.integer else "a number") + (
            " " + " and ".join(bounds) if bounds else "")


def Int(**bounds):
    return Bounded(integer=True, **bounds)


def Num(**bounds):
    return Bounded(**bounds)


Positive = Int(ge=1)
Fraction = Num(ge=0, le=1)


class PathT:
    def __init__(self, must_exist=False):
        self.must_exist = must_exist

    def __repr__(self):
        return "path"


Number = (int, float)
Path = OptionalT(PathT())
ExistingPath = OptionalT(PathT(must_exist=True))
TypedKwargs = {"type": str, "kwargs": OptionalT({"*": Any})}
# torch.optim / lr_scheduler kwargs: the numeric ones the configs use are typed and bounded (a
# string or a negative lr would otherwise fail only inside torch, naming no key); the names each
# type's constructor takes are checked against it (config_validation.optim_problems)
OptimKwargs = {
    "type": str,
    "kwargs": OptionalT({
        "lr": Num(ge=0), "weight_decay": Num(ge=0), "eps": Num(gt=0), "momentum": Num(ge=0),
        "betas": ListOf(Num(ge=0, lt=1), length=2),
        "gamma": Num(gt=0), "eta_min": Num(ge=0), "step_size": Num(gt=0), "T_max": Num(gt=0),
        "milestones": ListOf(Int(ge=0)),
        "*": Any,
    }),
}

AUGMENT = {
    "hflip": (bool, float),
    "vflip": (bool, float),
    "rotate": (bool, float, int),
    "color_jitter": OptionalT({"brightness": Number, "contrast": Number,
                               "saturation": Number, "hue": Number, "prob": Fraction}),
}

SPLIT = {
    "meta_file": Path,
    "rebalance": bool,
    "subsample": OptionalT(Positive),
    **AUGMENT,
}

SCHEMA = {
    "version": (str, int, float),
    "port": int,
    "random_seed": int,
    "deterministic": bool,
    "config_path": Path,
    "dataset": {
        "type": Choice("explicit", "custom", *SOURCES, "synthetic"),
        # mvtec|visa|cifar10|ader|folder: prepare manifests from the data itself (cached)
        "data_root": OptionalT((PathT(), ListOf(PathT()))),
        "cache_dir": Path,
        "check_files": bool,
        "cifar10": OptionalT({"normal_classes": (str, ListOf((int, str))), "seed": int}),
        "folder": OptionalT({"test_split": Num(ge=0, lt=1), "seed": int, "class_name": str}),
        "image_reader": {
            "type": Choice("opencv", "pil"),
            "kwargs": {"image_dir": Path, "color_mode": Choice("RGB", "BGR", "GRAY")},
        },
        "train": {
            **SPLIT,
            # DRAEM-style pseudo anomalies on the fly (datasets/pseudo_anomaly.py; DMAD)
            "pseudo_anomaly": OptionalT({
                "prob": Fraction, "seed": int,
                "texture_source": Choice("folder", "procedural", "self"),
                "texture_dir": Path, "beta": ListOf(Number, length=2),
                "perlin_scale": ListOf(int, length=2), "threshold": Number,
                "rotate": Number, "coverage": OptionalT(ListOf(Number, length=2)),
                "texture_augmentations": int, "pool": OptionalT(int),
            }),
        },
        "test": SPLIT,
        "input_size": ListOf(Positive, length=2),
        # how images/masks reach input_size (datasets/image_io.py): antialias = PIL bilinear
        # with antialiasing (UniAD); cv2_linear = OpenCV INTER_LINEAR, also what a config
        # without the key (old checkpoints, run folders) means
        "resize": Choice("antialias", "cv2_linear"),
        "pixel_mean": OptionalT(ListOf(Number, length=3)),
        "pixel_std": OptionalT(ListOf(Num(gt=0), length=3)),
        "batch_size": Positive,
        "test_batch_size": OptionalT(Positive),
        "workers": Int(ge=0),
        "classes": OptionalT(ListOf(str)),
        # k annotated test anomalies per class move into training (datasets/seen_anomalies.py)
        "seen_anomalies": OptionalT({
            "num_per_class": Int(ge=0), "seed": int, "classes": OptionalT(ListOf(str)),
            "join_training": bool,
        }),
        "validate": bool,
        "on_bad_file": Choice("error", "skip"),
        "synthetic": OptionalT({
            "root": Path, "seed": Int(ge=0), "classes": OptionalT(ListOf(str)),
            "image_size": Int(ge=64), "num_train": Positive, "num_test_good": Int(ge=0),
            "num_test_defect": Int(ge=0),
        }),
    },
    "criterion": ListOf({"name": str, "type": str, "kwargs": OptionalT({"*": Any})}),
    "trainer": {
        "max_epoch": Positive,
        "clip_max_norm": OptionalT(Num(ge=0)),  # 0: no clipping; < 0 would flip gradients
        "val_freq_epoch": Int(ge=0),  # 0: as 1
        "print_freq_step": Int(ge=0),  # 0: as 10
        "tb_freq_step": int,
        "amp": (bool, Choice("fp16", "bf16")),
        "optimizer": OptimKwargs,
        "lr_scheduler": OptionalT(OptimKwargs),
        "on_nonfinite": Choice("stop", "skip"),
        "feature_cache": (bool, Choice("auto")),
        "feature_cache_dtype": Choice("float32", "float16"),
        "feature_cache_dir": OptionalT(Path),
        "channels_last": bool,
        "compile": (bool, Choice("default", "reduce-overhead", "max-autotune")),
        "find_unused_parameters": bool,
        "max_nonfinite_steps": Int(ge=0),
    },
    "saver": {
        "auto_resume": bool,
        "always_save": bool,
        "load_path": Path,
        "save_dir": Path,
        "log_dir": Path,
    },
    "evaluator": {
        "save_dir": Path,
        "key_metric": str,
        "metrics": (ListOf(str), {"auc": ListOf({"name": str, "kwargs": OptionalT({"*": Any})})}),
        "image_score": {
            "reduction": Choice("max", "mean", "std", "topk"),
            "kernel": Positive,
            "topk": Num(gt=0, le=1),
        },
        "thresholds": OptionalT({  # utils/thresholds.py; holdout: datasets/holdout.py
            "image_rule": Choice("auto", "f1", "good_fpr"),
            "false_reject_rate": Num(gt=0, lt=1),
            "pixel_rule": Choice("auto", "f1", "good_pixel_rate", "none"),
            "pixel_rate": Num(gt=0, lt=1),
            "holdout": (Int(ge=1), Num(gt=0, lt=1)),  # a count, or a share of the goods
            "holdout_min": Int(ge=1),
            "normal_percentile": Any,  # folded into false_reject_rate: refused by name
        }),
        "vis": OptionalT({
            "normalize": Choice("global", "per_image"),
            "max_images": OptionalT(Positive),  # utils/visualize.py refuses 0 (after training)
            "alpha": Fraction,
            "tensorboard_panels": Int(ge=0),
        }),
        "vis_compound": OptionalT({"*": Any}),
        "vis_single": OptionalT({"*": Any}),
        "eval_dir": Path,
    },
    # choices that differ from the paper the config follows, by topic; copied into every
    # results protocol (null drops a base config's entry)
    "departures": OptionalT({"*": OptionalT(str)}),
    "frozen_layers": OptionalT(ListOf(str)),
    "net": ListOf({
        "name": str,
        "type": str,
        "prev": OptionalT(str),
        "frozen": bool,
        "kwargs": OptionalT({"*": Any}),
    }),
}
