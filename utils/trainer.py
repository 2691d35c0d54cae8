"""The training engine: one class drives training, evaluation, checkpoints and logging.

Every tool (``train_val.py``, the unified and per-class scripts) builds a ``Trainer`` from a
resolved config and calls ``fit()`` or ``evaluate()``; nothing else owns a training loop.
"""
import math
import os
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from datasets.builder import build_datasets, build_loader
from datasets.samplers import ResumableRandomSampler, ShardSampler
from utils import distributed as du
from models import ModelHelper
from models.losses import Criterion
from utils.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from utils.config import save_config, to_plain
from utils.evaluator import (compute_thresholds, evaluator_settings, metrics_from_inference,
                             normal_percentile, run_inference, write_scores,
                             write_thresholds)
from utils.feature_cache import (SkipPrefix, build_feature_cache, cache_key, load_cache,
                                 save_cache)
from utils.logger import attach_log_file, setup_logger
from utils.misc import set_seed
from utils.results import protocol_line, results_table, write_results
from utils.visualize import log_evaluation_images, vis_settings, write_panels
from utils.workdir_lock import WorkDirLock

OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}


class NonFiniteLossError(RuntimeError):
    pass


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def build_optimizer(params, cfg):
    cfg = cfg or {"type": "AdamW", "kwargs": {"lr": 1e-4}}
    kind = cfg.get("type", "AdamW")
    if kind not in OPTIMIZERS:
        raise ValueError(f"trainer.optimizer.type must be one of {list(OPTIMIZERS)}, "
                         f"got '{kind}'")
    try:
        return OPTIMIZERS[kind](params, **(cfg.get("kwargs") or {}))
    except TypeError as exc:
        raise ValueError(f"trainer.optimizer ({kind}): {exc}") from None


def build_scheduler(optimizer, cfg, max_epoch):
    if not cfg:
        return None
    kind = cfg.get("type")
    kwargs = dict(cfg.get("kwargs") or {})
    if kind == "StepLR":
        return torch.optim.lr_scheduler.StepLR(optimizer, **kwargs)
    if kind in ("CosineAnnealingLR", "cosine"):
        kwargs.setdefault("T_max", max_epoch)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, **kwargs)
    if kind == "MultiStepLR":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, **kwargs)
    raise ValueError(f"trainer.lr_scheduler.type must be StepLR, MultiStepLR or "
                     f"CosineAnnealingLR, got '{kind}'")


def schedule_changed(old_cfg, new_cfg):
    """Whether the keys the learning-rate schedule depends on differ between two configs."""
    def part(cfg):
        tr = (cfg or {}).get("trainer") or {}
        return (tr.get("max_epoch"), to_plain(tr.get("lr_scheduler")),
                to_plain((tr.get("optimizer") or {}).get("kwargs")))
    return old_cfg is not None and part(old_cfg) != part(new_cfg)


def amp_dtype_for(setting, device):
    """``trainer.amp``: false | true (fp16 on CUDA, bf16 on CPU) | 'fp16' | 'bf16'."""
    if not setting:
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16" or (setting is True and device.type == "cuda"):
        if device.type != "cuda":
            raise ValueError("trainer.amp 'fp16' needs CUDA; use 'bf16' on CPU")
        return torch.float16
    return torch.bfloat16


def gather_inference(parts):
    """Merge the ranks' shards of ``run_inference`` output back into dataset order."""
    import numpy as np

    merged = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        merged[key] = np.concatenate(values) if isinstance(values[0], np.ndarray) else \
            [v for part in values for v in part]
    order = np.argsort(merged["index"], kind="stable")
    for key, value in merged.items():
        merged[key] = value[order] if isinstance(value, np.ndarray) else \
            [value[i] for i in order]
    if len(np.unique(merged["index"])) != len(merged["index"]):
        raise RuntimeError("distributed evaluation saw an image twice")
    return merged


class Trainer:
    """``record`` is the run's invocation (``run.json``; see ``tools/_common.py``) and
    ``changes`` the overrides accepted for an existing run. The folder is created only after
    the config and data have been checked: a failed start leaves nothing behind."""

    def __init__(self, cfg, work_dir, device, class_name=None, progress=True, logger=None,
                 record=None, changes=None):
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.device = device
        self.class_name = class_name
        self.record = dict(record or {})
        self.changes = list(changes or [])
        self.rank, self.world = du.rank(), du.world_size()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        existed = self.work_dir.is_dir()
        self.lock = WorkDirLock(self.work_dir).acquire() if self.is_main and existed else None
        try:
            if logger is None:
                logger = setup_logger(self.work_dir / "log.txt" if existed else None,
                                      rank=self.rank, hold=not existed)
            self._build(cfg, device, class_name, logger)
            self.created_folder = self.is_main and not existed
            if self.created_folder:  # checked: now the folder may exist
                self.work_dir.mkdir(parents=True, exist_ok=True)
                self.lock = WorkDirLock(self.work_dir).acquire()
                attach_log_file(self.logger, self.work_dir / "log.txt")
        except BaseException:
            if self.lock is not None:  # a failed build must not keep the folder locked
                self.lock.release()
            raise

    def _build(self, cfg, device, class_name, logger):
        self.ckpt_dir = self.work_dir / "checkpoints"
        self.logger = logger
        self.seed = int(cfg.get("random_seed", 0))
        # same seed everywhere for the model's initial weights (DDP also broadcasts rank 0's)
        set_seed(self.seed, cfg.get("deterministic", False))
        tr = cfg.trainer
        self.max_epoch = int(tr.get("max_epoch", 1))
        self.val_freq = int(tr.get("val_freq_epoch", 1)) or 1
        self.print_freq = int(tr.get("print_freq_step", 10)) or 10
        self.clip = tr.get("clip_max_norm")
        self.on_nonfinite = tr.get("on_nonfinite", "stop")
        self.max_bad_steps = int(tr.get("max_nonfinite_steps", 20))
        self.amp_dtype = amp_dtype_for(tr.get("amp", False), device)
        self.metrics, self.score_cfg, self.key_metric = evaluator_settings(cfg)

        self.model = ModelHelper(cfg.net, input_size=cfg.dataset.input_size,
                                 frozen_layers=cfg.get("frozen_layers")).to(device)
        self.channels_last = bool(tr.get("channels_last", False))
        if self.channels_last:  # NHWC convolutions: faster backbones on CPU and tensor cores
            self.model.to(memory_format=torch.channels_last)
        self.pixel_mean, self.pixel_std = self._normalisation()
        with du.main_process_first():  # rank 0 generates/prepares data, the others reuse it
            self.train_set, self.test_set, self.classes = build_datasets(
                cfg, self.pixel_mean, self.pixel_std, class_name)
        self._validate_data()
        if any(int(r["label"]) == 1 for r in self.train_set.records) and not any(
                getattr(m, "learns_from_anomalies", False) for m in self.model.modules()):
            raise ValueError("the training set holds labelled anomalies (dataset."
                             "seen_anomalies or label 1 in the train manifest) but no module "
                             "of this net learns from them; a reconstruction model would "
                             "learn them as normal")
        if self.world > 1:  # each rank its own noise (jitter, dropout) from here on
            set_seed(self.seed + 7919 * self.rank)
        self.criterion = Criterion(cfg.get("criterion") or
                                   [{"name": "FeatureMSELoss", "type": "FeatureMSELoss",
                                     "kwargs": {"weight": 1.0}}])
        params = self.model.trainable_parameters()
        self.optimizer = build_optimizer(params, tr.get("optimizer")) if params else None
        self.scheduler = build_scheduler(self.optimizer, tr.get("lr_scheduler"),
                                         self.max_epoch) if self.optimizer else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        ds = cfg.dataset
        self.batch_size = int(ds.get("batch_size", 8))
        self.workers = int(ds.get("workers", 0))
        # order and worker seeds from (seed, epoch) only, never from the global RNG, so an
        # interrupted epoch replays exactly on --resume
        self.loader_gen = torch.Generator()
        self.sampler = ResumableRandomSampler(len(self.train_set), self.seed, self.world,
                                              self.rank)
        self.train_loader = build_loader(self.train_set, self.batch_size, self.workers,
                                         shuffle=True, generator=self.loader_gen,
                                         sampler=self.sampler)
        self.test_batch_size = int(ds.get("test_batch_size") or self.batch_size)
        self.test_loader = self._test_loader(self.test_set, self.workers)
        self.net = self.model  # what evaluation calls; SkipPrefix when cached
        self.train_net = self._wrap_train(self.net)
        self.use_cache = self._cache_wanted(tr.get("feature_cache", "auto"))
        self._train_cached = self._test_cached = False
        self.start_epoch = 0
        self.start_step = 0
        self._signal = None
        self.bad_steps = 0
        self.best_metric = -math.inf
        self.best_epoch = None
        self.best_results = None
        self.evaluations = 0
        self._writer = None

    # ------------------------------------------------------------------ helpers
    def _normalisation(self):
        ds = self.cfg.dataset
        mean, std = ds.get("pixel_mean"), ds.get("pixel_std")
        bb_mean, bb_std = self.model.pixel_mean, self.model.pixel_std
        if mean is None or std is None:
            if bb_mean is None:
                raise ValueError("dataset.pixel_mean/pixel_std are not set and the first net "
                                 "module does not state its input normalisation")
            return tuple(bb_mean), tuple(bb_std)
        if bb_mean is not None and (
                max(abs(a - b) for a, b in zip(mean, bb_mean)) > 1e-3 or
                max(abs(a - b) for a, b in zip(std, bb_std)) > 1e-3):
            self.logger.warning(f"dataset.pixel_mean/std {list(mean)}/{list(std)} differ from "
                                f"what the backbone's weights expect {list(bb_mean)}/"
                                f"{list(bb_std)}; using the config's values")
        return tuple(mean), tuple(std)

    def _test_loader(self, dataset, workers):
        """Under DDP each rank evaluates its own shard (no padding: no image twice)."""
        sampler = ShardSampler(len(dataset), self.world, self.rank) if self.world > 1 else None
        return build_loader(dataset, self.test_batch_size, workers, shuffle=False,
                            sampler=sampler, generator=torch.Generator().manual_seed(self.seed))

    def _wrap_train(self, net):
        """The module the training step calls: DDP when distributed, then ``torch.compile``
        when ``trainer.compile`` (evaluation runs the plain module)."""
        net = self._wrap_ddp(net)
        mode = self.cfg.trainer.get("compile", False)
        if mode:
            import shutil

            import torch._inductor.config as inductor_config

            if self.device.type == "cpu" and not any(
                    shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
                raise ValueError("trainer.compile on CPU needs a C++ compiler (g++ or clang++, "
                                 "or $CXX) for torch.compile's code generation; install one "
                                 "or set trainer.compile: false")

            # random draws (jitter, dropout) as in eager mode: compiling changes speed only
            inductor_config.fallback_random = True
            net = torch.compile(net, mode=None if mode is True else mode)
        return net

    def _wrap_ddp(self, net):
        if self.world <= 1 or self.optimizer is None:
            return net
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # buffers here are frozen statistics and constants: no need to sync them every step
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
            inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False}
        return DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=bool(self.cfg.trainer.get("find_unused_parameters", False)),
            **sync)

    def _validate_data(self):
        """``dataset.validate`` (default true): decode every file once before training."""
        from datasets.validation import check_classes, validate_records

        ds = self.cfg.dataset
        color = ((ds.get("image_reader") or {}).get("kwargs") or {}).get("color_mode", "RGB")
        for name, dataset in (("train", self.train_set), ("test", self.test_set)):
            source = getattr(dataset, "source", None) or f"the {name} manifest"
            if ds.get("validate", True):
                dataset.records, _ = validate_records(
                    dataset.records, dataset.image_dir, source, color,
                    ds.get("on_bad_file", "error"), self.progress, self.logger)
                if not dataset.records:
                    raise ValueError(f"no usable {name} images left in {source}")
        check_classes(self.train_set.records, self.test_set.records,
                      getattr(self.train_set, "source", "the train manifest"),
                      getattr(self.test_set, "source", "the test manifest"))

    def _cache_wanted(self, setting):
        """``trainer.feature_cache``: auto (when valid), true (error when invalid), false."""
        if not setting:
            return False
        prefix = self.model.frozen_prefix
        reasons = []
        if not prefix or len(prefix) == len(self.model.module_names):
            reasons.append("no frozen leading modules before a trainable one")
        if getattr(self.train_set, "augment", None) is not None:
            reasons.append("training augmentations are on (inputs change every epoch)")
        if not getattr(self.train_set, "deterministic", True):
            reasons.append("the training data is generated on the fly")
        if reasons:
            if setting is True:
                raise ValueError(f"trainer.feature_cache: true, but {'; '.join(reasons)}")
            self.logger.info(f"feature cache off: {'; '.join(reasons)}")
            return False
        return True

    def _cache_dtype(self):
        return torch.float16 if self.cfg.trainer.get("feature_cache_dtype") == "float16" \
            else torch.float32

    def _ensure_cache(self, train):
        """Swap a loader for one over cached prefix outputs, on first use."""
        if not self.use_cache or (self._train_cached if train else self._test_cached):
            return
        t0 = time.time()
        if train:
            # own generator: building the cache must not consume the global RNG, or the
            # feature jitter after it would differ from an uncached run
            base = build_loader(self.train_set, self.batch_size, self.workers, shuffle=False,
                                generator=torch.Generator().manual_seed(self.seed))
            cached, where = self._cached_features(self.train_set, base, "train")
            self.train_loader = build_loader(cached, self.batch_size, 0, shuffle=True,
                                             generator=self.loader_gen, sampler=self.sampler)
            self._train_cached = True
        else:
            base = build_loader(self.test_set, self.test_batch_size, self.workers,
                                shuffle=False, generator=torch.Generator().manual_seed(self.seed))
            cached, where = self._cached_features(self.test_set, base, "test")
            self.test_loader = self._test_loader(cached, 0)
            self._test_cached = True
        self.net = SkipPrefix(self.model, len(self.model.frozen_prefix))
        self.train_net = self._wrap_train(self.net)
        self.logger.info(f"cached {'train' if train else 'test'} features of "
                         f"{', '.join(self.model.frozen_prefix)} for {len(cached)} images, "
                         f"{where} ({time.time() - t0:.1f}s)")

    def _cached_features(self, dataset, loader, split):
        """In memory, or through ``trainer.feature_cache_dir`` on disk (rank 0 writes, the
        other ranks read). Returns the cached dataset and where it came from."""
        dtype = self._cache_dtype()
        desc = f"caching {split} features"
        cache_dir = self.cfg.trainer.get("feature_cache_dir")
        if not cache_dir:
            return build_feature_cache(self.model, loader, self.device, dtype, self.progress,
                                       desc), "computed"
        key = cache_key(self.model, dataset, self.cfg.net, dtype, split)
        path = Path(cache_dir) / f"{split}-{key[:32]}.pt"
        with du.main_process_first():
            cached = load_cache(path, key)
            if cached is not None and len(cached) == len(dataset):
                return cached, f"read from {path}"
            cached = build_feature_cache(self.model, loader, self.device, dtype, self.progress,
                                         desc)
            if self.is_main:
                save_cache(cached, path, key)
        return cached, f"computed and written to {path}"

    @property
    def writer(self):
        if not self.is_main:
            return du.NullWriter()
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.work_dir / "events"))
        return self._writer

    def protocol(self, epochs_trained=None, reported=None):
        """What the figures mean, from what the weights actually went through."""
        backbone = self.cfg.net[0]
        epochs = self.max_epoch if epochs_trained is None else epochs_trained
        protocol = {
            "dataset": self.cfg.dataset.get("type", "explicit"),
            "classes": list(self.classes),
            "setting": self.record.get("setting") or
            ("single-class" if self.class_name else "unified"),
            "input_size": list(self.cfg.dataset.input_size),
            "resize": self.cfg.dataset.get("resize", "cv2_linear"),
            "epochs": epochs,
            "reported": reported or f"final epoch ({epochs})",
            "seed": self.seed,
            "image_score": self.score_cfg["reduction"] +
            (f"(avgpool {self.score_cfg['kernel']})" if self.score_cfg["reduction"] == "max"
             else ""),
            "backbone": (backbone.get("kwargs") or {}).get("model_name") or
            backbone.type.rsplit(".", 1)[-1],
        }
        if self.max_epoch != epochs:
            protocol["epochs_planned"] = self.max_epoch
        seen = getattr(self.train_set, "seen_anomalies", None)
        if seen:  # semi-supervised: which test images became training anomalies
            protocol["seen_anomalies"] = seen
        overrides = [h for h in self.record.get("history", []) if h.get("changes")]
        if overrides:  # accepted --override changes: the config differs from the one started
            protocol["overrides"] = [f"{c['key']}: {c['old']!r} -> {c['new']!r} "
                                     f"({h['action']} {h['time']})"
                                     for h in overrides for c in h["changes"]]
        return protocol

    def train_files(self):
        """Every image the weights were fitted on (seen anomalies included), by manifest name:
        an evaluation set holding any of them is refused."""
        return sorted({str(r["filename"]) for r in self.train_set.records})

    def state_dict(self, epoch, step=0):
        """``epoch`` finished epochs; ``step`` finished steps of the next one (interrupts).
        Plain data only (see utils/checkpoint.py): opening it never runs code."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "step": step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_results": self.best_results,
            "evaluations": self.evaluations,
            "key_metric": self.key_metric,
            "rng": rng_state(),
            "rng_per_rank": du.all_gather_objects(rng_state()) if self.world > 1 else None,
            "config": to_plain(self.cfg),
            "run": self.record,
            "train_files": self.train_files(),
            "pixel_mean": list(self.pixel_mean),
            "pixel_std": list(self.pixel_std),
            "classes": list(self.classes),
            # decision thresholds + normalisation of the latest evaluation (its "epoch" says
            # which); None before the first evaluation
            "thresholds": getattr(self, "thresholds", None),
        }

    def load_state(self, state, resume=True):
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit this model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        if not resume:
            return
        if self.optimizer and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"])
        self.start_step = int(state.get("step", 0))
        if self.scheduler and state.get("scheduler"):
            if schedule_changed(state.get("config"), self.cfg):
                self._rebuild_schedule(self.start_epoch)
            else:
                self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best_metric = state.get("best_metric", -math.inf)
        self.best_epoch = state.get("best_epoch")
        self.best_results = state.get("best_results")
        self.evaluations = int(state.get("evaluations") or 0)
        self.thresholds = state.get("thresholds")
        per_rank = state.get("rng_per_rank")
        if per_rank and len(per_rank) == self.world:
            set_rng_state(per_rank[self.rank])
        else:
            set_rng_state(state["rng"])

    def _rebuild_schedule(self, epochs_done):
        """An accepted change of ``trainer.max_epoch``, the optimizer's kwargs or the schedule
        on resume: the learning rate continues on the new schedule as if the run had been
        planned that way from the start (new base lr, stepped ``epochs_done`` times)."""
        import warnings

        kwargs = (self.cfg.trainer.get("optimizer") or {}).get("kwargs") or {}
        for group in self.optimizer.param_groups:
            for key, value in kwargs.items():
                if key in group and key != "params":
                    group[key] = value
            group["initial_lr"] = group["lr"] = kwargs.get("lr", group.get("initial_lr",
                                                                           group["lr"]))
        self.scheduler = build_scheduler(self.optimizer, self.cfg.trainer.get("lr_scheduler"),
                                         self.max_epoch)
        with warnings.catch_warnings():  # stepping without optimizer steps is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(epochs_done):
                self.scheduler.step()
        self.logger.info(f"learning-rate schedule rebuilt for {self.max_epoch} epochs: lr "
                         f"{self.optimizer.param_groups[0]['lr']:.3e} after epoch {epochs_done}")

    def resume(self, path=None, trusted=False):
        path = Path(path or self.ckpt_dir / "last.pth")
        state = load_checkpoint(path, map_location=self.device, trusted=trusted)
        self.load_state(state, resume=True)
        where = f" step {self.start_step}" if self.start_step else ""
        self.logger.info(f"resumed from {path} after epoch {self.start_epoch}{where}")

    # ------------------------------------------------------------------ training
    def to_device(self, batch):
        """Tensors to the device; heads that learn from masks/labels (DMAD) read them too."""
        out = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
               for k, v in batch.items()}
        if self.channels_last and torch.is_tensor(out.get("image")) and out["image"].dim() == 4:
            out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
        return out

    def prepare_modules(self):
        """Stage one of two-stage methods: a module with ``prepare(trainer)`` (e.g. a memory
        bank built from the training set) runs it once before the first epoch; its result
        lives in the module's state and so in every checkpoint."""
        for name in self.model.module_names:
            module = getattr(self.model, name)
            if hasattr(module, "prepare"):
                self.logger.info(f"preparing '{name}' ({type(module).__name__})")
                module.prepare(self)

    def train_one_epoch(self, epoch, start_step=0):
        self._ensure_cache(train=True)
        if hasattr(self.train_set, "set_epoch"):  # data made on the fly follows the epoch
            self.train_set.set_epoch(epoch)
        self.model.train()
        self.loader_gen.manual_seed(self.seed * 1000003 + epoch)
        self.sampler.set_epoch(epoch, start_step * self.batch_size)
        n = start_step + len(self.train_loader)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.max_epoch}",
                   disable=not self.progress, leave=False, dynamic_ncols=True,
                   initial=start_step, total=n)
        total, count = 0.0, 0
        for step, batch in enumerate(bar, start=start_step):
            inputs = self.to_device(batch)
            batch_size = len(batch["index"])
            with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                enabled=self.amp_dtype is not None):
                outputs = self.train_net(inputs)
                loss, parts = self.criterion(outputs)
            if not torch.isfinite(loss):
                where = f"epoch {epoch + 1}, step {step + 1}"
                self.bad_steps += 1
                if self.on_nonfinite != "skip" or self.bad_steps > self.max_bad_steps:
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at {where}; training stopped, the last good "
                        f"checkpoint is kept in {self.ckpt_dir} (trainer.on_nonfinite: skip "
                        f"skips such steps, up to trainer.max_nonfinite_steps)")
                self.logger.warning(f"loss is {loss.item()} at {where}: step skipped "
                                    f"({self.bad_steps} so far)")
                self.optimizer.zero_grad(set_to_none=True)
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            value = loss.item()
            total += value * batch_size
            count += batch_size
            bar.set_postfix(loss=f"{value:.4f}")
            gstep = epoch * n + step
            if (step + 1) % self.print_freq == 0 or step + 1 == n:
                self.writer.add_scalar("train/loss", value, gstep)
                for name, part in parts.items():
                    self.writer.add_scalar(f"train/{name}", part.item(), gstep)
                self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], gstep)
            if self._stop_requested():
                self.interrupt(epoch, step + 1)
        return total / max(count, 1)

    def _stop_requested(self):
        """Under DDP every rank must stop at the same step (the checkpoint is collective)."""
        flag = self._signal is not None
        if self.world > 1:
            t = torch.tensor([int(flag)], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self._signal is None:
                self._signal = signal.SIGTERM
        return flag

    def interrupt(self, epoch, step):
        path = self.ckpt_dir / "last.pth"
        self.save(epoch, "last.pth", step)
        name = signal.Signals(self._signal).name
        raise TrainingInterrupted(self._signal, f"{name} at epoch {epoch + 1}, step {step}: "
                                  f"checkpoint written to {path}; continue with --resume")

    def _on_signal(self, signum, frame):
        if self._signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._signal = signum
        self.logger.warning(f"{signal.Signals(signum).name} received: saving a checkpoint "
                            f"after this step (send again to stop at once)")

    def _write_record(self, action):
        """``run.json``: the invocation, plus a history entry for accepted changes."""
        if not self.is_main:
            return
        from utils.run_record import history_entry, write_record

        rec = self.record
        rec["classes"] = list(self.classes)
        rec["seen_anomalies"] = getattr(self.train_set, "seen_anomalies", None) or {}
        rec["resolved_device"] = str(self.device)
        rec["world_size"] = self.world
        rec.setdefault("history", [])
        if action == "start":
            rec.setdefault("setting", "single-class" if self.class_name else "unified")
            rec["class_name"] = self.class_name
        elif self.changes:
            import sys

            rec["history"].append(history_entry(action, self.changes, sys.argv))
        write_record(self.work_dir, rec)

    def fit(self):
        if self.optimizer is None:
            raise ValueError("nothing to train: every module in net is frozen")
        if self.is_main:
            fresh = self.start_epoch == 0 and self.start_step == 0
            self._write_record("start" if fresh and not self.changes else "resume")
            save_config(self.cfg, self.work_dir / "config.yaml")
        log = self.logger
        log.info(f"work_dir: {self.work_dir}")
        log.info(f"device: {self.device}; train images: {len(self.train_set)}, test images: "
                 f"{len(self.test_set)}, classes: {', '.join(self.classes)}")
        n_train = sum(p.numel() for p in self.model.trainable_parameters())
        log.info(f"trainable parameters: {n_train / 1e6:.2f} M")
        t0 = time.time()
        if self.start_epoch == 0 and self.start_step == 0:
            self.prepare_modules()
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                pass
        try:
            return self._fit_epochs(t0)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.close()

    def _fit_epochs(self, t0):
        """Returns the final epoch's results (what ADer and the papers report); the best
        evaluation by ``evaluator.key_metric`` is kept beside it, labelled as selected on the
        test set, and in ``best.pth`` for UniAD users."""
        log = self.logger
        final = None
        for epoch in range(self.start_epoch, self.max_epoch):
            t_epoch = time.time()
            start = self.start_step if epoch == self.start_epoch else 0
            loss = self.train_one_epoch(epoch, start)
            if self.scheduler:
                self.scheduler.step()
            log.info(f"epoch {epoch + 1}/{self.max_epoch} loss {loss:.5f} "
                     f"lr {self.optimizer.param_groups[0]['lr']:.2e} "
                     f"({time.time() - t_epoch:.1f}s)")
            self.writer.add_scalar("train/epoch_loss", loss, epoch + 1)
            done = epoch + 1
            if done % self.val_freq == 0 or done == self.max_epoch:
                results = self.evaluate_now(epoch=done)
                self.evaluations += 1
                value = results["mean"].get(self.key_metric)
                value = -math.inf if value is None else value
                if self.best_epoch is None or value > self.best_metric:
                    self.best_metric, self.best_epoch = value, done
                    self.best_results = results
                    self.save(done, "best.pth")
                    log.info(f"new best {self.key_metric} {value:.4f} at epoch {done}")
                if done == self.max_epoch:
                    final = results
            self.save(done, "last.pth")
            if self._stop_requested():  # arrived during evaluation
                self.interrupt(done, 0)
        log.info(f"training done in {time.time() - t0:.1f}s; best {self.key_metric} "
                 f"{self.best_metric:.4f} at epoch {self.best_epoch} (selected on the test set)")
        if final is None:
            return None
        final = dict(final)
        if self.evaluations > 1 and self.best_results is not None:
            final["best_on_test_set"] = {
                "note": f"selected on the test set by {self.key_metric} among "
                        f"{self.evaluations} evaluations; not the reported result",
                "epoch": self.best_epoch, "key_metric": self.key_metric,
                "per_class": self.best_results["per_class"],
                "mean": self.best_results["mean"]}
        self.report(final, title=f"final epoch {final.get('epoch')}")
        return final

    # ------------------------------------------------------------------ evaluation
    def evaluate_now(self, epoch=None, protocol=None):
        """Metrics of the current weights; also sets ``self.thresholds`` (saved with the next
        checkpoint) and ``self.last_inference`` (maps and scores, for pictures)."""
        self._ensure_cache(train=False)
        inf = run_inference(self.net, self.test_loader, self.device, self.score_cfg,
                            self.amp_dtype, progress=self.progress)
        if self.world > 1:
            inf = gather_inference(du.all_gather_objects(inf))
        per_class, mean = metrics_from_inference(inf, self.metrics, self.classes)
        if protocol is None:
            protocol = self.protocol(epochs_trained=epoch, reported=f"epoch {epoch}"
                                     if epoch is not None and epoch != self.max_epoch
                                     else None)
        results = {"protocol": protocol, "per_class": per_class, "mean": mean}
        self.thresholds = compute_thresholds(inf, self.score_cfg, self.classes,
                                             normal_percentile(self.cfg), epoch)
        self.last_inference = inf
        if epoch is not None:
            results["epoch"] = epoch
            for name, value in mean.items():
                if value is not None:
                    self.writer.add_scalar(f"val/mean_{name}", value, epoch)
            for cls, values in per_class.items():
                for name, value in values.items():
                    if value is not None:
                        self.writer.add_scalar(f"val/{cls}/{name}", value, epoch)
            log_evaluation_images(self.writer, inf, self.test_set, self.thresholds, epoch,
                                  vis_settings(self.cfg))
            self.logger.info(f"evaluation at epoch {epoch}:\n" +
                             results_table(results, fmt="simple"))
        return results

    def check_leakage(self, state, checkpoint):
        """Refuse to score images the weights were fitted on (seen anomalies, training files)."""
        trained = set(state.get("train_files") or [])
        leaked = sorted(str(r["filename"]) for r in self.test_set.records
                        if str(r["filename"]) in trained)
        if leaked:
            raise ValueError(
                f"the evaluation set holds {len(leaked)} image(s) that checkpoint {checkpoint} "
                f"was trained on, e.g. {', '.join(leaked[:5])}; scoring them would inflate the "
                f"figures. Evaluate with the run's own config (its dataset.seen_anomalies "
                f"removes them from the test set)")

    def evaluate(self, checkpoint, vis=False, trusted=False, allow_changes=False):
        """See ``_evaluate``; an evaluation refused before it ran leaves no folder behind."""
        try:
            return self._evaluate(checkpoint, vis, trusted, allow_changes)
        except BaseException:
            self.close()
            if getattr(self, "created_folder", False) and not (
                    self.work_dir / "results.json").exists():
                import shutil

                shutil.rmtree(self.work_dir, ignore_errors=True)
            raise

    def _evaluate(self, checkpoint, vis, trusted, allow_changes):
        """Evaluate a checkpoint (left unchanged) into this Trainer's folder: results.json/md,
        per-image ``scores.csv``, ``thresholds.json`` and, with ``vis``, panels under
        ``vis/<class>/<defect>``. The protocol says what the checkpoint went through."""
        from utils.run_record import config_diff, format_changes

        state = load_checkpoint(checkpoint, map_location=self.device, trusted=trusted)
        accepted = {c["key"] for h in self.record.get("history", []) for c in h["changes"]}
        differs = [d for d in config_diff(state.get("config") or {}, to_plain(self.cfg))
                   if d[0] not in accepted]  # changes the run's history already records
        if differs and not allow_changes:
            raise ValueError(f"checkpoint {checkpoint} was trained with another config than "
                             f"the one evaluating it:\n{format_changes(differs)}\nadd "
                             f"--override to evaluate it so anyway (recorded in the results)")
        self.check_leakage(state, checkpoint)
        self.load_state(state, resume=False)
        epoch, step = state.get("epoch"), int(state.get("step") or 0)
        done = f"{epoch} epochs" + (f" and {step} steps" if step else "")
        protocol = self.protocol(epochs_trained=epoch,
                                 reported=f"checkpoint {Path(checkpoint).name} after {done}")
        trained_for = ((state.get("config") or {}).get("trainer") or {}).get("max_epoch")
        if trained_for is not None:
            protocol["epochs_planned"] = trained_for
        if state.get("run", {}).get("seen_anomalies"):
            protocol["seen_anomalies"] = state["run"]["seen_anomalies"]
        if differs:
            protocol["overrides"] = [f"{k}: {o!r} -> {n!r} (evaluation)" for k, o, n in differs]
        results = self.evaluate_now(protocol=protocol)
        results["checkpoint"] = str(Path(checkpoint).resolve())
        results["epoch"] = epoch
        self.thresholds["epoch"] = epoch
        self.report(results, title=f"checkpoint {checkpoint}")
        if not self.is_main:
            self.close()
            return results
        write_thresholds(self.thresholds, self.work_dir)
        write_scores(self.last_inference, self.thresholds, self.work_dir)
        if vis:
            settings = vis_settings(self.cfg)
            paths = write_panels(self.last_inference, self.test_set, self.thresholds,
                                 self.work_dir / "vis", settings["normalize"],
                                 settings["max_images"], settings["alpha"])
            self.logger.info(f"{len(paths)} panels written under {self.work_dir / 'vis'}")
        self.close()
        return results

    def save(self, epoch, name, step=0):
        state = self.state_dict(epoch, step)  # every rank: it gathers RNG states
        if self.is_main:
            save_checkpoint(state, self.ckpt_dir / name)
        du.barrier()

    def report(self, results, title):
        if not self.is_main:
            return
        write_results(results, self.work_dir)
        self.logger.info(f"results ({title})\n{protocol_line(results['protocol'])}\n" +
                         results_table(results, fmt="simple"))

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
