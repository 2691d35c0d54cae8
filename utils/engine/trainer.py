"""The training loop: the Trainer ties the pieces of the engine together.

Every tool (``train_val.py``, the unified and per-class scripts, a sweep) builds a ``Trainer``
from a resolved config and calls ``fit()`` or ``evaluate()``; nothing else owns a training loop.
The Trainer's other jobs live beside it: ``feature_cache.py`` (the frozen prefix computed once),
``checkpointing.py`` (state, resume, run record), ``evaluation.py`` (metrics, protocol,
reports) and ``stage_one.py`` (heads fitted on the training data before training).
"""
import math
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dualmem.datasets.builder import build_datasets, build_loader
from dualmem.datasets.samplers import ResumableRandomSampler, ShardSampler
from dualmem.models import ModelHelper
from dualmem.models.losses import Criterion
from dualmem.utils import distributed as du
from dualmem.utils.run_record import save_run_config
from dualmem.utils.config_defaults import apply_defaults, input_settings
from dualmem.utils.engine.builders import build_optimizer, build_scheduler, wrap_training_net
from dualmem.utils.misc import amp_dtype_for, set_seed
from dualmem.utils.engine.checkpointing import CheckpointMixin
from dualmem.utils.engine.evaluation import EvaluationMixin
from dualmem.utils.engine.feature_cache import FeatureCacheMixin
from dualmem.utils.engine.stage_one import run_stage_one, stage_one_modules
from dualmem.utils.errors import NonFiniteLossError
from dualmem.utils.evaluator import evaluator_settings
from dualmem.utils.logger import attach_log_file, setup_logger
from dualmem.utils.workdir_lock import WorkDirLock
from dualmem.utils.errors import UserError


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


class Trainer(FeatureCacheMixin, CheckpointMixin, EvaluationMixin):
    """``record`` is the run's invocation (``run.json``; see ``utils/run_plan.py``) and
    ``changes`` the overrides accepted for an existing run. The folder is created only after
    the config and data have been checked: a failed start leaves nothing behind."""

    def __init__(self, cfg, work_dir, device, class_name=None, progress=True, logger=None,
                 record=None, changes=None):
        self.cfg = apply_defaults(cfg)  # a config built in code gets them here
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
        self.seed = int(cfg.random_seed)
        # same seed everywhere for the model's initial weights (DDP also broadcasts rank 0's)
        set_seed(self.seed, cfg.deterministic)
        tr = cfg.trainer
        self.max_epoch = int(tr.max_epoch)
        self.val_freq = int(tr.val_freq_epoch) or 1
        self.print_freq = int(tr.print_freq_step) or 10
        self.clip = tr.clip_max_norm
        self.on_nonfinite = tr.on_nonfinite
        self.max_bad_steps = int(tr.max_nonfinite_steps)
        self.amp_dtype = amp_dtype_for(tr.amp, device)
        self.metrics, self.score_cfg, self.key_metric = evaluator_settings(cfg)

        self.model = ModelHelper(cfg.net, input_size=cfg.dataset.input_size,
                                 frozen_layers=cfg.get("frozen_layers")).to(device)
        self.channels_last = bool(tr.channels_last)
        if self.channels_last:  # NHWC convolutions: faster backbones on CPU and tensor cores
            self.model.to(memory_format=torch.channels_last)
        self.pixel_mean, self.pixel_std = self._normalisation()
        with du.main_process_first():  # rank 0 generates/prepares data, the others reuse it
            self.train_set, self.test_set, self.classes = build_datasets(
                cfg, self.pixel_mean, self.pixel_std, class_name)
        self._validate_data()
        if any(int(r["label"]) == 1 for r in self.train_set.records) and not any(
                getattr(m, "learns_from_anomalies", False) for m in self.model.modules()):
            raise UserError("the training set holds labelled anomalies (dataset."
                             "seen_anomalies or label 1 in the train manifest) but no module "
                             "of this net learns from them; a reconstruction model would "
                             "learn them as normal")
        if self.world > 1:  # each rank its own noise (jitter, dropout) from here on
            set_seed(self.seed + 7919 * self.rank)
        self.criterion = Criterion(cfg.criterion)
        params = self.model.trainable_parameters()
        self.optimizer = build_optimizer(params, tr.optimizer) if params else None
        self.scheduler = build_scheduler(self.optimizer, tr.lr_scheduler,
                                         self.max_epoch) if self.optimizer else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        ds = cfg.dataset
        self.batch_size = int(ds.batch_size)
        self.workers = int(ds.workers)
        # order and worker seeds from (seed, epoch) only, never from the global RNG, so an
        # interrupted epoch replays exactly on --resume
        self.loader_gen = torch.Generator()
        self.sampler = ResumableRandomSampler(len(self.train_set), self.seed, self.world,
                                              self.rank)
        if hasattr(self.train_set, "epoch_source"):
            # data made on the fly follows the sampler's epoch, so a resumed epoch replays it
            self.train_set.epoch_source = self.sampler
        self.train_loader = build_loader(self.train_set, self.batch_size, self.workers,
                                         shuffle=True, generator=self.loader_gen,
                                         sampler=self.sampler)
        self.test_batch_size = int(ds.get("test_batch_size") or self.batch_size)
        self.test_loader = self._test_loader(self.test_set, self.workers)
        self.net = self.model  # what evaluation calls; SkipPrefix when cached
        self.train_net = self._wrap_train(self.net)
        self.use_cache = self._cache_wanted(tr.feature_cache)
        self._train_cached = self._test_cached = False
        self.start_epoch = 0
        self.start_step = 0
        self._signal = None
        self.pending_eval = None  # an epoch whose evaluation did not finish (see resume)
        self.bad_steps = 0
        self.best_metric = -math.inf
        self.best_epoch = None
        self.best_results = None
        self.evaluations = 0
        self._writer = None

    def _normalisation(self):
        ds = self.cfg.dataset
        mean, std = ds.get("pixel_mean"), ds.get("pixel_std")
        bb_mean, bb_std = self.model.pixel_mean, self.model.pixel_std
        if mean is None or std is None:
            if bb_mean is None:
                raise UserError("dataset.pixel_mean/pixel_std are not set and the first net "
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
        return wrap_training_net(net, self.cfg.trainer, self.device, self.world,
                                 self.optimizer is not None)

    def _validate_data(self):
        """``dataset.validate`` (default true): decode every file once before training."""
        from dualmem.datasets.validation import check_classes, validate_records

        ds = self.cfg.dataset
        color = input_settings(self.cfg).color_mode
        for name, dataset in (("train", self.train_set), ("test", self.test_set)):
            source = getattr(dataset, "source", None) or f"the {name} manifest"
            if ds.validate:
                before = dataset.records
                dataset.records, _ = validate_records(
                    dataset.records, dataset.image_dir, source, color,
                    ds.on_bad_file, self.progress, self.logger)
                kept = {id(r) for r in dataset.records}  # skipped files go to the protocol
                dataset.skipped = [r for r in before if id(r) not in kept]
                if not dataset.records:
                    raise UserError(f"no usable {name} images left in {source}")
        check_classes(self.train_set.records, self.test_set.records,
                      getattr(self.train_set, "source", "the train manifest"),
                      getattr(self.test_set, "source", "the test manifest"))

    @property
    def writer(self):
        if not self.is_main:
            return du.NullWriter()
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.work_dir / "events"))
        return self._writer

    # ------------------------------------------------------------------ training
    def to_device(self, batch):
        """Tensors to the device; heads that learn from masks/labels (DMAD) read them too."""
        out = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
               for k, v in batch.items()}
        if self.channels_last and torch.is_tensor(out.get("image")) and out["image"].dim() == 4:
            out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
        return out

    def prepare_modules(self):
        """Stage one of two-stage methods: heads that declare ``fit_spec()`` are fitted on the
        training data (e.g. memory banks) before the first epoch; what they build lives in
        their state and so in every checkpoint."""
        run_stage_one(self.model, self.train_set, self.device, self.batch_size, self.workers,
                      self.progress, self.logger.info)

    def train_one_epoch(self, epoch, start_step=0):
        self._ensure_cache(train=True)
        if hasattr(self.train_set, "set_epoch"):  # data made on the fly follows the epoch
            self.train_set.set_epoch(epoch)
        self.model.train()
        self.loader_gen.manual_seed(self.seed * 1000003 + epoch)
        self.sampler.set_epoch(epoch, start_step * self.batch_size)
        n = start_step + len(self.train_loader)
        self.steps_per_epoch = n  # validation is logged at the epoch's last training step
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

    def interrupt(self, epoch, step, evaluated=False):
        """``evaluated``: the stop came during the evaluation after epoch ``epoch``, which
        finished (and ``last.pth`` holds it already)."""
        path = self.ckpt_dir / "last.pth"
        name = signal.Signals(self._signal).name
        if not evaluated:
            self.save(epoch, "last.pth", step)
            raise TrainingInterrupted(self._signal, f"{name} at epoch {epoch + 1}, step {step}: "
                                      f"checkpoint written to {path}; continue with --resume")
        done = (f"; results written to {self.work_dir / 'results.json'} (a per-class run or "
                f"sweep continues the rest with --resume or the same command)"
                if epoch == self.max_epoch else
                f", checkpoint written to {path}; continue with --resume")
        raise TrainingInterrupted(self._signal, f"{name} during the evaluation after epoch "
                                  f"{epoch}: it finished{done}")

    def _on_signal(self, signum, frame):
        if self._signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._signal = signum
        self.logger.warning(f"{signal.Signals(signum).name} received: saving a checkpoint "
                            f"after this step (send again to stop at once)")

    def fit(self):
        if self.optimizer is None and not stage_one_modules(self.model):
            raise UserError("nothing to train: every module in net is frozen")
        if self.is_main:
            fresh = self.start_epoch == 0 and self.start_step == 0
            save_run_config(self.work_dir, self.cfg, self.record)  # its hash goes in run.json
            self._write_record("start" if fresh and not self.changes else "resume")
        log = self.logger
        log.info(f"work_dir: {self.work_dir}")
        log.info(f"device: {self.device}; train images: {len(self.train_set)}, test images: "
                 f"{len(self.test_set)}, classes: {', '.join(self.classes)}")
        n_train = sum(p.numel() for p in self.model.trainable_parameters())
        log.info(f"trainable parameters: {n_train / 1e6:.2f} M")
        t0 = time.time()
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                pass
        try:  # a stop in stage one is kept: the first step's checkpoint holds what it built
            if self.start_epoch == 0 and self.start_step == 0:
                self.prepare_modules()
            return self._fit_epochs(t0)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.close()

    def _fit_epochs(self, t0):
        """Returns the final epoch's results (what ADer and the papers report)."""
        log = self.logger
        final = None
        if self.pending_eval is not None:  # stopped during this evaluation: it runs first
            log.info(f"the evaluation after epoch {self.pending_eval} did not finish: "
                     f"running it now")
            self.sampler.set_epoch(self.pending_eval - 1, 0)
            self.steps_per_epoch = len(self.train_loader)
            final = self._evaluate_epoch(self.pending_eval)
        for epoch in range(self.start_epoch, self.max_epoch):
            t_epoch = time.time()
            start = self.start_step if epoch == self.start_epoch else 0
            done = epoch + 1
            if self.optimizer is None:  # training-free (PatchCore): stage one was the fit
                self.steps_per_epoch = 1
                log.info(f"epoch {done}/{self.max_epoch}: nothing to train (the net was fitted "
                         f"in stage one)")
            else:
                loss = self.train_one_epoch(epoch, start)
                if self.scheduler:
                    self.scheduler.step()
                log.info(f"epoch {done}/{self.max_epoch} loss {loss:.5f} "
                         f"lr {self.optimizer.param_groups[0]['lr']:.2e} "
                         f"({time.time() - t_epoch:.1f}s)")
            step = done * self.steps_per_epoch - 1  # train/* and val/* share one step axis
            if self.optimizer is not None:
                self.writer.add_scalar("train/epoch_loss", loss, step)
            if done % self.val_freq == 0 or done == self.max_epoch:
                final = self._evaluate_epoch(done)
                continue
            self.save(done, "last.pth")
            if self._stop_requested():
                self.interrupt(done, 0)
        log.info(f"training done in {time.time() - t0:.1f}s; {self.best_summary()}")
        return final

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
