"""Checkpoint state and resume: what a checkpoint holds (plain data only, see
utils/checkpoint.py), how a run continues from one, and the run record (``run.json``)."""
import math
from pathlib import Path

from utils import code_state
from utils import distributed as du
from utils.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from utils.config import to_plain
from utils.engine.builders import build_scheduler, schedule_changed


class CheckpointMixin:
    """The Trainer's checkpoint side: ``state_dict`` / ``load_state`` / ``resume`` / ``save``."""

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

    def save(self, epoch, name, step=0):
        state = self.state_dict(epoch, step)  # every rank: it gathers RNG states
        if self.is_main:
            save_checkpoint(state, self.ckpt_dir / name)
        du.barrier()

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
                rec["history"].append(history_entry(action, list(self.changes) + code,
                                                    sys.argv))
        write_record(self.work_dir, rec)
