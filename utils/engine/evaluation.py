"""Evaluation and reporting: metrics of the current weights, a checkpoint's evaluation (with
the leakage guard and the protocol of what it went through), and the result files."""
from pathlib import Path

from dualmem.datasets.manifest import (ANY_CLASS, data_summary, file_id, ids_matching,
                               relative_name, ungroup_ids)
from dualmem.utils.config_defaults import input_settings
from dualmem.utils import distributed as du
from dualmem.utils.checkpoint import load_checkpoint
from dualmem.utils.config import to_plain
from dualmem.utils.evaluator import (compute_thresholds, evaluation_notes, metrics_from_inference,
                             run_inference, write_scores, write_thresholds)
from dualmem.utils.results import operating_point_table, protocol_line, results_table, write_results
from dualmem.utils.thresholds import operating_points, rules_summary, threshold_settings
from dualmem.utils.visualize import log_evaluation_images, vis_settings
from dualmem.utils.errors import UserError


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


def run_identity(record, cfg):
    """The config a run started from, its ``--opts`` and the config's ``departures`` (choices
    that differ from the paper it follows), so a results table names what it measured."""
    out = {}
    config_file = record.get("config_file")
    if config_file:
        root = Path(__file__).resolve().parents[2]
        path = Path(config_file)
        out["config"] = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    if record.get("opts"):
        out["opts"] = list(record["opts"])
    departures = {k: v for k, v in (cfg.get("departures") or {}).items() if v}
    if departures:
        out["departures"] = departures
    return out


def recorded_ids(held, roots=()):
    """File ids a checkpoint or ``run.json`` says the weights were fitted on: its cumulative
    ``trained_on``, plus, from older runs, ``train_files`` and the seen anomalies joined to
    training (names without their class: ``ANY_CLASS``)."""
    held = held or {}
    ids = set(ungroup_ids(held.get("trained_on")))
    seen = held.get("seen_anomalies") or {}
    names = list(held.get("train_files") or []) + (
        list(seen.get("files") or []) if seen.get("join_training", True) else [])
    ids |= {(ANY_CLASS, relative_name(n, roots)) for n in names}
    return ids


def data_changes(before, now):
    """One line per class whose counts or test files differ between the checkpoint's data
    summary and this evaluation's (nothing when the checkpoint predates the summary)."""
    if not before:
        return []
    out = []
    for cls in sorted(set(before) | set(now)):
        a, b = before.get(cls), now.get(cls)
        if a is None or b is None:
            out.append(f"{cls}: {'not in the checkpoint' if a is None else 'no longer present'}")
            continue
        parts = [f"{k} {a.get(k)} -> {b.get(k)}" for k in ("train", "test", "test_files")
                 if a.get(k) != b.get(k)]
        if parts:
            out.append(f"{cls}: {', '.join(parts)}")
    return out


class EvaluationMixin:
    """The Trainer's evaluation side: ``evaluate_now``, ``evaluate``, ``protocol``, ``report``."""

    @property
    def data_roots(self):
        from dualmem.datasets.builder import data_roots

        return data_roots(self.cfg)

    def trained_ids(self):
        """Every image these weights were ever fitted on or banked, over every draw of seen
        anomalies this run went through (``trained_before``: read on ``--resume``); it only
        grows. Saved in each checkpoint."""
        now = {file_id(r, self.data_roots) for r in self.train_set.records}
        return now | set(getattr(self, "trained_before", ()) or ())

    def anomalies_trained_on(self):
        """The labelled anomalies (seen anomalies of every draw) the run trained on or banked,
        as ``run.json`` keeps them: the earlier record's plus this start's."""
        roots = self.data_roots
        anomalous = {file_id(r, roots) for r in self.train_set.records if int(r["label"]) == 1}
        if "trained_on" in self.record:  # it holds every earlier draw already
            return anomalous | ungroup_ids(self.record["trained_on"])
        return anomalous | recorded_ids(self.record, roots)  # a record from before it

    def data_summary(self):
        """Per class: image counts, the test files' fingerprint, skipped files (computed once:
        the data do not change while a Trainer lives)."""
        if getattr(self, "_data_summary", None) is None:
            skipped = {"train": getattr(self.train_set, "skipped", None),
                       "test": getattr(self.test_set, "skipped", None)}
            self._data_summary = data_summary(self.train_set.records, self.test_set.records,
                                              getattr(self.test_set, "image_dir", None),
                                              self.data_roots, skipped)
        return self._data_summary

    def protocol(self, epochs_trained=None, reported=None):
        """What the figures mean, from what the weights actually went through."""
        backbone = self.cfg.net[0]
        epochs = self.max_epoch if epochs_trained is None else epochs_trained
        protocol = {
            "dataset": self.cfg.dataset.type,
            "classes": list(self.classes),
            "setting": self.record.get("setting") or
            ("single-class" if self.class_name else "unified"),
            "input_size": list(self.cfg.dataset.input_size),
            "resize": input_settings(self.cfg).resize,
            "epochs": epochs,
            "reported": reported or f"final epoch ({epochs})",
            "seed": self.seed,
            "image_score": self.score_cfg["reduction"] +
            (f"(avgpool {self.score_cfg['kernel']})" if self.score_cfg["reduction"] == "max"
             else ""),
            "backbone": (backbone.get("kwargs") or {}).get("model_name") or
            backbone.type.rsplit(".", 1)[-1],
            "method": self.cfg.net[-1].type.rsplit(".", 1)[-1],
        }
        if not self.model.trainable_parameters():  # PatchCore: 'epochs' are evaluations only
            protocol["training"] = "none: fitted in stage one (memory bank), no optimizer steps"
        protocol["data"] = self.data_summary()  # which images, per class: counts, fingerprint
        protocol.update(run_identity(self.record, self.cfg))
        if self.max_epoch != epochs:
            protocol["epochs_planned"] = self.max_epoch
        seen = getattr(self.train_set, "seen_anomalies", None)
        if seen:  # semi-supervised: which test images became training anomalies
            protocol["seen_anomalies"] = seen
        overrides = [h for h in self.record.get("history", []) if h.get("changes") and
                     h.get("action") != "evaluate"]  # an evaluation's changes were its own
        if overrides:  # accepted --override changes: the config differs from the one started
            protocol["overrides"] = [f"{c['key']}: {c['old']!r} -> {c['new']!r} "
                                     f"({h['action']} {h['time']})"
                                     for h in overrides for c in h["changes"]]
        return protocol

    def evaluate_now(self, epoch=None, protocol=None, step=None):
        """Metrics of the current weights; also sets ``self.thresholds`` (saved with the next
        checkpoint) and ``self.last_inference`` (maps and scores, for pictures)."""
        self._ensure_cache(train=False)
        inf = run_inference(self.net, self.test_loader, self.device, self.score_cfg,
                            self.amp_dtype, progress=self.progress)
        if self.world > 1:
            inf = gather_inference(du.all_gather_objects(inf))
        import numpy as np

        masked = np.array([bool(r.get("maskname")) for r in self.test_set.records], bool)
        inf["has_mask"] = masked[inf["index"].astype(np.int64)]  # a real mask file, per image
        per_class, mean = metrics_from_inference(inf, self.metrics, self.classes)
        if protocol is None:
            protocol = self.protocol(epochs_trained=epoch, reported=f"epoch {epoch}"
                                     if epoch is not None and epoch != self.max_epoch
                                     else None)
        self.thresholds = compute_thresholds(inf, self.score_cfg, self.classes,
                                             threshold_settings(self.cfg), epoch,
                                             self.score_held_out())
        notes, self.key_metric_used = evaluation_notes(inf, mean, self.key_metric, self.classes)
        held = getattr(self.train_set, "holdout", None)
        protocol.update(notes, thresholds=rules_summary(self.thresholds,
                                                         held.counts if held else None))
        if self.key_metric_used != self.key_metric and self.is_main and \
                not getattr(self, "_key_said", False):
            self._key_said = True  # once per run: every protocol says it too
            self.logger.warning(f"key metric: {notes['key_metric']}")
        results = {"protocol": protocol, "per_class": per_class, "mean": mean,
                   "operating_point": operating_points(inf, self.thresholds)}
        self.last_inference = inf
        if epoch is not None:
            results["epoch"] = epoch
            tb_step = epoch if step is None else step
            for name, value in mean.items():
                if value is not None:
                    self.writer.add_scalar(f"val/mean_{name}", value, tb_step)
            for cls, values in per_class.items():
                for name, value in values.items():
                    if value is not None:
                        self.writer.add_scalar(f"val/{cls}/{name}", value, tb_step)
            log_evaluation_images(self.writer, inf, self.test_set, self.thresholds, tb_step,
                                  vis_settings(self.cfg),
                                  no_masks=results["protocol"].get("no_masks") or ())
            self.logger.info(f"evaluation at epoch {epoch}:\n" +
                             results_table(results, fmt="simple") +
                             operating_point_table(results, fmt="simple"))
        return results

    def score_held_out(self):
        """``{"clsname", "score", "maps"}`` of the held-out good images (datasets/holdout.py),
        computed as prediction computes them (``utils.inference.anomaly_maps``: the run's
        precision and cached prefix), for the good-image threshold rules; None without any.
        Images these weights were trained on (``check_leakage``) are left out."""
        import numpy as np

        from dualmem.datasets.builder import build_loader
        from dualmem.utils.inference import anomaly_maps, inference_settings
        from dualmem.utils.metrics import image_score_from_map

        held = getattr(self.train_set, "holdout", None)
        if held is None or held.dataset is None:
            return None
        settings = inference_settings(self.cfg, len(self.model.frozen_prefix)
                                      if self.use_cache else 0)
        trained = getattr(self, "held_out_trained", set())
        out = {"clsname": [], "maps": []}
        loader = build_loader(held.dataset, self.test_batch_size, self.workers, shuffle=False)
        for batch in loader:
            keep = [i for i, (c, f) in enumerate(zip(batch["clsname"], batch["filename"]))
                    if file_id({"clsname": c, "filename": f}, self.data_roots) not in trained]
            if keep:
                maps = anomaly_maps(self.model, batch["image"][keep], settings, self.device)
                out["maps"].append(maps.astype(np.float32, copy=False))
                out["clsname"] += [batch["clsname"][i] for i in keep]
        if not out["clsname"]:
            return None
        out["maps"] = np.concatenate(out["maps"])
        out["score"] = image_score_from_map(out["maps"], **self.score_cfg)
        return out

    def check_leakage(self, state, checkpoint, action="evaluation"):
        """Refuse to score images the weights were fitted on or banked: the checkpoint's and the
        run record's cumulative sets (every draw of seen anomalies), matched by class and name
        relative to the data root, so a moved data folder or another draw cannot hide them."""
        state_roots = ((state.get("config") or {}).get("dataset") or {}).get("data_root")
        trained = (recorded_ids(state, state_roots) |
                   recorded_ids(state.get("run"), self.data_roots) |
                   recorded_ids(self.record, self.data_roots))
        held = getattr(self.train_set, "holdout", None)
        again = ids_matching(held.records, trained, self.data_roots) if held else []
        if again:  # e.g. a run from before the hold-out: they cannot set its thresholds
            self.held_out_trained = {file_id(r, self.data_roots) for r in held.records
                                     if file_id(r, self.data_roots)[1] in set(again)}
            self.logger.warning(f"{len(again)} of the {len(held.records)} held-out good "
                                f"images were trained on by checkpoint {checkpoint}: not "
                                f"used for thresholds (and no longer trained on): "
                                f"{', '.join(again[:10])}{' ...' if len(again) > 10 else ''}")
        leaked = ids_matching(self.test_set.records, trained, self.data_roots)
        if not leaked:
            return
        more = f" and {len(leaked) - 10} more" if len(leaked) > 10 else ""
        hint = ("a --resume cannot change the seen anomalies of a run that has already trained "
                "or banked others (they stay in its weights and memory banks): start a new run "
                "for another draw" if action == "--resume" else
                "evaluate with the run's own config (its dataset.seen_anomalies removes them "
                "from the test set)")
        raise UserError(
            f"the {action} test set holds {len(leaked)} image(s) that checkpoint {checkpoint} "
            f"was trained on or banked: {', '.join(leaked[:10])}{more}; scoring them would "
            f"inflate the figures. Refused: {hint}")

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
        per-image ``scores.csv``, ``thresholds.json``, and the pictures: curves, histograms,
        heat-map panels under ``vis/<class>/<defect>`` and ``report.html`` (always drawn;
        ``vis`` is kept for the ``--vis`` flag of older commands). The protocol says what the
        checkpoint went through."""
        from dualmem.utils.run_record import config_diff, format_changes

        state = load_checkpoint(checkpoint, map_location=self.device, trusted=trusted)
        accepted = {c["key"] for h in self.record.get("history", [])
                    if h.get("action") != "evaluate" for c in h["changes"]}
        differs = [d for d in config_diff(state.get("config") or {}, to_plain(self.cfg))
                   if d[0] not in accepted]  # changes the run's history already records
        if differs and not allow_changes:
            raise UserError(f"checkpoint {checkpoint} was trained with another config than "
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
            protocol["overrides"] = protocol.get("overrides", []) + [
                f"{k}: {o!r} -> {n!r} (evaluation)" for k, o, n in differs]
        changed = data_changes(state.get("data"), protocol["data"])
        if changed:  # e.g. images added to a test folder since training: said, not silent
            protocol["data_changed"] = changed
            self.logger.warning("the data differ from those the checkpoint was trained and "
                                "evaluated with: " + "; ".join(changed))
        results = self.evaluate_now(protocol=protocol)
        results["checkpoint"] = str(Path(checkpoint).resolve())
        if self.is_main:  # the code that scored it, beside the code that trained it
            from dualmem.utils.code_state import snapshot

            snap = snapshot(exclude=self.work_dir)
            results["evaluated_with"] = {"dualmem_version": snap.version,
                                         "code_diff": snap.save(self.work_dir)}
        results["epoch"] = epoch
        self.thresholds["epoch"] = epoch
        self.report(results, title=f"checkpoint {checkpoint}")
        if not self.is_main:
            self.close()
            return results
        write_thresholds(self.thresholds, self.work_dir)
        write_scores(self.last_inference, self.thresholds, self.work_dir)
        self.write_pictures(results, self.work_dir)
        self.close()
        return results

    def report(self, results, title):
        if not self.is_main:
            return
        write_results(results, self.work_dir)
        self.logger.info(f"results ({title})\n{protocol_line(results['protocol'])}\n" +
                         results_table(results, fmt="simple") +
                         operating_point_table(results, fmt="simple"))

    def write_pictures(self, results, out_dir, step=None):
        """Curves, score histograms, heat-map panels (``vis/``) and ``report.html`` of the
        latest evaluation (rank 0; TensorBoard images too when training)."""
        if not self.is_main:
            return
        from dualmem.utils.report import write_evaluation_pictures

        paths = write_evaluation_pictures(
            self.last_inference, self.thresholds, self.test_set, out_dir, results,
            writer=self.writer if step is not None else None, step=step,
            vis_cfg=vis_settings(self.cfg))
        self.logger.info(f"{len(paths)} pictures and {paths[-1]} written")
