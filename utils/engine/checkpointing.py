"""Checkpoint state and resume: what a checkpoint holds (plain data only, see
utils/checkpoint.py), how a run continues from one, and the run record (``run.json``)."""
import math
from pathlib import Path

from dualmem.utils import code_state
from dualmem.utils import distributed as du
from dualmem.utils.inference import inference_settings
from dualmem.utils.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dualmem.utils.config import to_plain
from dualmem.datasets.manifest import file_id, group_ids
from dualmem.utils.engine.builders import build_scheduler, schedule_changed
from dualmem.utils.engine.evaluation import recorded_ids


class CheckpointMixin:
    """The Trainer's checkpoint side: ``state_dict`` / ``load_state`` / ``resume`` / ``save``."""

    def train_files(self):
        """Every image the weights were fitted on (seen anomalies included), by manifest name:
        an evaluation set holding any of them is refused."""
        return sorted({str(r["filename"]) for r in self.train_set.records})

    def held_out_ids(self):
        """The training good images kept apart for thresholds (datasets/holdout.py): never
        trained on nor banked; recorded beside ``trained_on``."""
        held = getattr(self.train_set, "holdout", None)
        return {file_id(r, self.data_roots) for r in held.records} if held else set()

    def best_summary(self):
        """The end-of-training line on the best evaluation (never a '-inf')."""
        if self.best_epoch is None or self.best_metric is None or \
                self.best_metric == -math.inf:
            return (f"no best evaluation: key metric "
                    f"{getattr(self, 'key_metric_note', 'not available')}")
        return (f"best {getattr(self, 'best_key', self.key_metric)} {self.best_metric:.4f} at "
                f"epoch {self.best_epoch} (selected on the test set)")

    def state_dict(self, epoch, step=0, pending=False):
        """``epoch`` finished epochs; ``step`` finished steps of the next one (interrupts);
        ``pending``: the evaluation after ``epoch`` has not finished (``--resume`` runs it).
        Plain data only (see utils/checkpoint.py): opening it never runs code."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "step": step,
            "evaluation_pending": bool(pending),
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_results": self.best_results,
            "evaluations": self.evaluations,
            "key_metric": self.key_metric,
            "best_key": getattr(self, "best_key", None),  # the metric best.pth was chosen by
            "rng": rng_state(),
            "rng_per_rank": du.all_gather_objects(rng_state()) if self.world > 1 else None,
            "config": to_plain(self.cfg),
            "run": self.record,
            "train_files": self.train_files(),
            # every image fitted on or banked, all draws ({class: names relative to the root})
            "trained_on": group_ids(self.trained_ids()),
            # good images held out for the thresholds ({class: names}), never trained on
            "held_out": group_ids(self.held_out_ids()),
            "data": self.data_summary(),
            "pixel_mean": list(self.pixel_mean),
            "pixel_std": list(self.pixel_std),
            "classes": list(self.classes),
            # decision thresholds + normalisation of the latest evaluation (its "epoch" says
            # which); None before the first evaluation
            "thresholds": getattr(self, "thresholds", None),
            # how evaluation ran the model (cached prefix, precisions): predict and the API
            # run it the same way
            "inference": inference_settings(
                self.cfg, len(self.model.frozen_prefix) if self.use_cache else 0),
        }

    def load_state(self, state, resume=True):
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit this model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        if not resume:
            return
        # what the weights already went through stays in the guard's set (a later draw of
        # seen anomalies adds to it)
        roots = ((state.get("config") or {}).get("dataset") or {}).get("data_root")
        self.trained_before = recorded_ids(state, roots)
        if self.optimizer and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"])
        self.start_step = int(state.get("step", 0))
        self.pending_eval = self.start_epoch if state.get("evaluation_pending") else None
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
        self.best_key = state.get("best_key") or state.get("key_metric") or self.key_metric
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
        self.check_leakage(state, path, action="--resume")  # before anything is written
        if self.start_epoch + (self.start_step > 0) > self.max_epoch:
            from dualmem.utils.errors import UserError

            raise UserError(f"{path} holds {self.start_epoch} trained epochs"
                            f"{f' and {self.start_step} steps' if self.start_step else ''} but "
                            f"trainer.max_epoch is {self.max_epoch}: a resume cannot train "
                            f"fewer epochs than it has (--evaluate scores the checkpoint)")
        if self.start_epoch == self.max_epoch and self.pending_eval is None and (
                self.changes or not (self.work_dir / "results.json").is_file()):
            # finished training without results (a checkpoint from before the pending flag),
            # or an accepted change to a finished run: its final evaluation runs (again)
            self.pending_eval = self.max_epoch
        where = f" step {self.start_step}" if self.start_step else ""
        self.logger.info(f"resumed from {path} after epoch {self.start_epoch}{where}")

    def save(self, epoch, name, step=0, pending=False):
        state = self.state_dict(epoch, step, pending)  # every rank: it gathers RNG states
        if self.is_main:
            save_checkpoint(state, self.ckpt_dir / name)
        du.barrier()

    def _evaluate_epoch(self, done):
        """The evaluation after epoch ``done``. ``last.pth`` is written first, marked as
        waiting for it, and again once it (and after the final epoch, the results) is done: a
        stop during it loses neither the epoch nor the evaluation (``--resume`` runs it). The
        best evaluation by ``evaluator.key_metric`` is kept beside the final one, labelled as
        selected on the test set, and in ``best.pth`` for UniAD users."""
        self.save(done, "last.pth", pending=True)
        results = self.evaluate_now(epoch=done, step=done * self.steps_per_epoch - 1)
        self.evaluations += 1
        key = self.key_metric_used  # evaluator.key_metric, or the image metric it fell to
        self.key_metric_note = results["protocol"].get("key_metric")
        value = None if key is None else results["mean"].get(key)
        if value is None:  # nothing to rank by (no anomalies): no best.pth, said once
            if not getattr(self, "_no_best_said", False):
                self._no_best_said = True
                self.logger.info(f"best.pth not written: key metric {self.key_metric_note}")
        elif self.best_epoch is None or getattr(self, "best_key", key) != key or \
                value > self.best_metric:
            self.best_metric, self.best_epoch, self.best_key = value, done, key
            self.best_results = results
            self.save(done, "best.pth")
            self.logger.info(f"new best {key} {value:.4f} at epoch {done}")
        final = None
        if done == self.max_epoch:
            final = dict(results)
            if self.evaluations > 1 and self.best_results is not None:
                final["best_on_test_set"] = {
                    "note": f"selected on the test set by {self.best_key} among "
                            f"{self.evaluations} evaluations; not the reported result",
                    "epoch": self.best_epoch, "key_metric": self.best_key,
                    "per_class": self.best_results["per_class"],
                    "mean": self.best_results["mean"]}
            self.report(final, title=f"final epoch {done}")
            self.write_pictures(final, self.work_dir, step=done * self.steps_per_epoch - 1)
        self.save(done, "last.pth")
        if self._stop_requested():  # arrived during the evaluation, which finished
            self.interrupt(done, 0, evaluated=True)
        return final

    def _write_record(self, action):
        """``run.json``: the invocation, plus a history entry for accepted changes, appended
        to the history as it is on disk now (under its lock: an evaluation of this run may
        add its own entry at the same time)."""
        if not self.is_main:
            return
        from dualmem.utils.run_record import history_entry, update_record

        rec = self.record
        rec["classes"] = list(self.classes)
        # the labelled anomalies of every draw so far: the leak guard's set, never reduced
        rec["trained_on"] = group_ids(self.anomalies_trained_on())
        rec["held_out"] = group_ids(self.held_out_ids())  # kept apart for the thresholds
        rec["seen_anomalies"] = getattr(self.train_set, "seen_anomalies", None) or {}
        rec["resolved_device"] = str(self.device)
        rec["world_size"] = self.world
        entries = []
        if action == "start":
            rec.setdefault("setting", "single-class" if self.class_name else "unified")
            rec["class_name"] = self.class_name
            snap = code_state.snapshot(exclude=self.work_dir)
            rec["dualmem_version"] = snap.version
            rec["code_diff"] = snap.save(self.work_dir)
        else:
            import sys

            snap, env = code_state.snapshot(exclude=self.work_dir), code_state.environment()
            rec.setdefault("environment", env)  # a record from before versions were kept
            code = code_state.state_changes(rec, snap.version, env)  # other code or packages
            if snap.dirty and any(k == "dualmem_version" for k, _, _ in code):
                rec.setdefault("code_diffs", []).append(
                    snap.save(self.work_dir, f"code-{snap.version.split('+dirty.')[-1]}.diff"))
            if self.changes or code:
                entries.append(history_entry(action, list(self.changes) + code, sys.argv))
        self.record = update_record(self.work_dir, rec, entries)
