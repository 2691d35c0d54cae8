"""The training engine: one class drives training, evaluation, checkpoints and logging.

Every tool (``train_val.py``, the unified and per-class scripts) builds a ``Trainer`` from a
resolved config and calls ``fit()`` or ``evaluate()``; nothing else owns a training loop.
"""
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from datasets.builder import build_datasets, build_loader
from models import ModelHelper
from models.losses import Criterion
from utils.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from utils.config import save_config, to_plain
from utils.evaluator import evaluator_settings, metrics_from_inference, run_inference
from utils.logger import setup_logger
from utils.misc import set_seed
from utils.results import protocol_line, results_table, write_results

OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}


class NonFiniteLossError(RuntimeError):
    pass


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


class Trainer:
    def __init__(self, cfg, work_dir, device, class_name=None, progress=True, logger=None):
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.device = device
        self.class_name = class_name
        self.progress = progress
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.work_dir / "checkpoints"
        self.logger = logger or setup_logger(self.work_dir / "log.txt")
        self.seed = int(cfg.get("random_seed", 0))
        set_seed(self.seed, cfg.get("deterministic", False))
        tr = cfg.trainer
        self.max_epoch = int(tr.get("max_epoch", 1))
        self.val_freq = int(tr.get("val_freq_epoch", 1)) or 1
        self.print_freq = int(tr.get("print_freq_step", 10)) or 10
        self.clip = tr.get("clip_max_norm")
        self.amp_dtype = amp_dtype_for(tr.get("amp", False), device)
        self.metrics, self.score_cfg, self.key_metric = evaluator_settings(cfg)

        self.model = ModelHelper(cfg.net, input_size=cfg.dataset.input_size,
                                 frozen_layers=cfg.get("frozen_layers")).to(device)
        self.pixel_mean, self.pixel_std = self._normalisation()
        self.train_set, self.test_set, self.classes = build_datasets(
            cfg, self.pixel_mean, self.pixel_std, class_name)
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
        self.loader_gen = torch.Generator()
        self.train_loader = build_loader(self.train_set, self.batch_size, self.workers,
                                         shuffle=True, generator=self.loader_gen)
        self.test_loader = build_loader(self.test_set, int(ds.get("test_batch_size") or
                                                           self.batch_size),
                                        self.workers, shuffle=False,
                                        generator=torch.Generator().manual_seed(self.seed))
        self.start_epoch = 0
        self.best_metric = -math.inf
        self.best_epoch = None
        self.best_results = None
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

    @property
    def writer(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.work_dir / "events"))
        return self._writer

    def protocol(self):
        backbone = self.cfg.net[0]
        return {
            "dataset": self.cfg.dataset.get("type", "explicit"),
            "classes": list(self.classes),
            "setting": "single-class" if self.class_name or len(self.classes) == 1
            else "unified",
            "input_size": list(self.cfg.dataset.input_size),
            "epochs": self.max_epoch,
            "seed": self.seed,
            "image_score": self.score_cfg["reduction"] +
            (f"(avgpool {self.score_cfg['kernel']})" if self.score_cfg["reduction"] == "max"
             else ""),
            "backbone": (backbone.get("kwargs") or {}).get("model_name") or
            backbone.type.rsplit(".", 1)[-1],
        }

    def state_dict(self, epoch):
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_results": self.best_results,
            "key_metric": self.key_metric,
            "rng": rng_state(),
            "config": to_plain(self.cfg),
            "pixel_mean": list(self.pixel_mean),
            "pixel_std": list(self.pixel_std),
            "classes": list(self.classes),
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
        if self.scheduler and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.best_metric = state.get("best_metric", -math.inf)
        self.best_epoch = state.get("best_epoch")
        self.best_results = state.get("best_results")
        set_rng_state(state["rng"])

    def resume(self, path=None):
        path = Path(path or self.ckpt_dir / "last.pth")
        state = load_checkpoint(path, map_location=self.device)
        self.load_state(state, resume=True)
        self.logger.info(f"resumed from {path} at epoch {self.start_epoch}")

    # ------------------------------------------------------------------ training
    def train_one_epoch(self, epoch):
        self.model.train()
        self.loader_gen.manual_seed(self.seed * 1000003 + epoch)
        n = len(self.train_loader)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.max_epoch}",
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        total, count = 0.0, 0
        for step, batch in enumerate(bar):
            image = batch["image"].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                enabled=self.amp_dtype is not None):
                outputs = self.model({"image": image})
                loss, parts = self.criterion(outputs)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch + 1}, step "
                                         f"{step + 1}; the last good checkpoint is kept in "
                                         f"{self.ckpt_dir}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            value = loss.item()
            total += value * image.shape[0]
            count += image.shape[0]
            bar.set_postfix(loss=f"{value:.4f}")
            gstep = epoch * n + step
            if (step + 1) % self.print_freq == 0 or step + 1 == n:
                self.writer.add_scalar("train/loss", value, gstep)
                for name, part in parts.items():
                    self.writer.add_scalar(f"train/{name}", part.item(), gstep)
                self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], gstep)
        return total / max(count, 1)

    def fit(self):
        if self.optimizer is None:
            raise ValueError("nothing to train: every module in net is frozen")
        save_config(self.cfg, self.work_dir / "config.yaml")
        log = self.logger
        log.info(f"work_dir: {self.work_dir}")
        log.info(f"device: {self.device}; train images: {len(self.train_set)}, test images: "
                 f"{len(self.test_set)}, classes: {', '.join(self.classes)}")
        n_train = sum(p.numel() for p in self.model.trainable_parameters())
        log.info(f"trainable parameters: {n_train / 1e6:.2f} M")
        t0 = time.time()
        for epoch in range(self.start_epoch, self.max_epoch):
            t_epoch = time.time()
            loss = self.train_one_epoch(epoch)
            if self.scheduler:
                self.scheduler.step()
            log.info(f"epoch {epoch + 1}/{self.max_epoch} loss {loss:.5f} "
                     f"lr {self.optimizer.param_groups[0]['lr']:.2e} "
                     f"({time.time() - t_epoch:.1f}s)")
            self.writer.add_scalar("train/epoch_loss", loss, epoch + 1)
            done = epoch + 1
            if done % self.val_freq == 0 or done == self.max_epoch:
                results = self.evaluate_now(epoch=done)
                value = results["mean"].get(self.key_metric)
                value = -math.inf if value is None else value
                if self.best_epoch is None or value > self.best_metric:
                    self.best_metric, self.best_epoch = value, done
                    self.best_results = results
                    save_checkpoint(self.state_dict(done), self.ckpt_dir / "best.pth")
                    log.info(f"new best {self.key_metric} {value:.4f} at epoch {done}")
            save_checkpoint(self.state_dict(done), self.ckpt_dir / "last.pth")
        log.info(f"training done in {time.time() - t0:.1f}s; best {self.key_metric} "
                 f"{self.best_metric:.4f} at epoch {self.best_epoch}")
        if self.best_results is not None:
            self.report(self.best_results, title=f"best epoch {self.best_epoch}")
        self.close()
        return self.best_results

    # ------------------------------------------------------------------ evaluation
    def evaluate_now(self, epoch=None):
        inf = run_inference(self.model, self.test_loader, self.device, self.score_cfg,
                            self.amp_dtype, progress=self.progress)
        per_class, mean = metrics_from_inference(inf, self.metrics, self.classes)
        results = {"protocol": self.protocol(), "per_class": per_class, "mean": mean}
        if epoch is not None:
            results["epoch"] = epoch
            for name, value in mean.items():
                if value is not None:
                    self.writer.add_scalar(f"val/mean_{name}", value, epoch)
            for cls, values in per_class.items():
                for name, value in values.items():
                    if value is not None:
                        self.writer.add_scalar(f"val/{cls}/{name}", value, epoch)
            self.logger.info(f"evaluation at epoch {epoch}:\n" +
                             results_table(results, fmt="simple"))
        return results

    def evaluate(self, checkpoint):
        state = load_checkpoint(checkpoint, map_location=self.device)
        self.load_state(state, resume=False)
        results = self.evaluate_now()
        results["checkpoint"] = str(checkpoint)
        results["epoch"] = state.get("epoch")
        self.report(results, title=f"checkpoint {checkpoint}")
        self.close()
        return results

    def report(self, results, title):
        write_results(results, self.work_dir)
        self.logger.info(f"results ({title})\n{protocol_line(results['protocol'])}\n" +
                         results_table(results, fmt="simple"))

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
