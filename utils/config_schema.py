"""The keys a DualMem config may hold, with their types.

UniAD's own keys are accepted (so its configs load), plus DualMem's additions. ``"*"`` marks a
mapping with free keys. ``net[*].kwargs`` is checked later against the module's constructor.
"""


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


class PathT:
    def __init__(self, must_exist=False):
        self.must_exist = must_exist

    def __repr__(self):
        return "path"


Number = (int, float)
Path = OptionalT(PathT())
ExistingPath = OptionalT(PathT(must_exist=True))
TypedKwargs = {"type": str, "kwargs": OptionalT({"*": Any})}
# torch.optim / lr_scheduler kwargs: the numeric ones the configs use are typed (a string there,
# e.g. a mistyped 1e-4, would otherwise fail only inside torch, naming no key); others are free
OptimKwargs = {
    "type": str,
    "kwargs": OptionalT({
        "lr": Number, "weight_decay": Number, "eps": Number, "momentum": Number,
        "betas": ListOf(Number, length=2),
        "gamma": Number, "eta_min": Number, "step_size": Number, "T_max": Number,
        "*": Any,
    }),
}

AUGMENT = {
    "hflip": (bool, float),
    "vflip": (bool, float),
    "rotate": (bool, float, int),
    "color_jitter": OptionalT({"brightness": Number, "contrast": Number,
                               "saturation": Number, "hue": Number, "prob": Number}),
}

SPLIT = {
    "meta_file": Path,
    "rebalance": bool,
    "subsample": OptionalT(int),
    **AUGMENT,
}

SCHEMA = {
    "version": (str, int, float),
    "port": int,
    "random_seed": int,
    "deterministic": bool,
    "config_path": Path,
    "dataset": {
        "type": Choice("explicit", "custom", "mvtec", "visa", "cifar10", "ader", "folder",
                       "synthetic"),
        # mvtec|visa|cifar10|ader|folder: prepare manifests from the data itself (cached)
        "data_root": OptionalT((PathT(), ListOf(PathT()))),
        "cache_dir": Path,
        "check_files": bool,
        "cifar10": OptionalT({"normal_classes": (str, ListOf((int, str))), "seed": int}),
        "folder": OptionalT({"test_split": Number, "seed": int, "class_name": str}),
        "image_reader": {
            "type": Choice("opencv", "pil"),
            "kwargs": {"image_dir": Path, "color_mode": Choice("RGB", "BGR", "GRAY")},
        },
        "train": {
            **SPLIT,
            # DRAEM-style pseudo anomalies on the fly (datasets/pseudo_anomaly.py; DMAD)
            "pseudo_anomaly": OptionalT({
                "prob": Number, "seed": int,
                "texture_source": Choice("folder", "procedural", "self"),
                "texture_dir": Path, "beta": ListOf(Number, length=2),
                "perlin_scale": ListOf(int, length=2), "threshold": Number,
                "rotate": Number, "coverage": OptionalT(ListOf(Number, length=2)),
                "texture_augmentations": int, "pool": OptionalT(int),
            }),
        },
        "test": SPLIT,
        "input_size": ListOf(int, length=2),
        # how images/masks reach input_size (datasets/image_io.py): antialias = PIL bilinear
        # with antialiasing (UniAD); cv2_linear = OpenCV INTER_LINEAR, also what a config
        # without the key (old checkpoints, run folders) means
        "resize": Choice("antialias", "cv2_linear"),
        "pixel_mean": OptionalT(ListOf(Number, length=3)),
        "pixel_std": OptionalT(ListOf(Number, length=3)),
        "batch_size": int,
        "test_batch_size": OptionalT(int),
        "workers": int,
        "classes": OptionalT(ListOf(str)),
        # k annotated test anomalies per class move into training (datasets/seen_anomalies.py)
        "seen_anomalies": OptionalT({
            "num_per_class": int, "seed": int, "classes": OptionalT(ListOf(str)),
            "join_training": bool,
        }),
        "validate": bool,
        "on_bad_file": Choice("error", "skip"),
        "synthetic": OptionalT({
            "root": Path, "seed": int, "classes": OptionalT(ListOf(str)),
            "image_size": int, "num_train": int, "num_test_good": int, "num_test_defect": int,
        }),
    },
    "criterion": ListOf({"name": str, "type": str, "kwargs": OptionalT({"*": Any})}),
    "trainer": {
        "max_epoch": int,
        "clip_max_norm": OptionalT(Number),
        "val_freq_epoch": int,
        "print_freq_step": int,
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
        "max_nonfinite_steps": int,
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
            "kernel": int,
            "topk": Number,
        },
        "thresholds": OptionalT({"normal_percentile": Number}),
        "vis": OptionalT({
            "normalize": Choice("global", "per_image"),
            "max_images": OptionalT(int),
            "alpha": Number,
            "tensorboard_panels": int,
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
