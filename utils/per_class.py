"""One model per class, in turn (the single-class setting): what the sweep's folder holds and
how its classes' results become one table.

The sweep's folder holds its own ``config.yaml`` / ``run.json`` and one run folder per class
(``<work_dir>/<class>/``, resumable or evaluable alone); the loop that trains them is
``utils.engine.runs.run_per_class``. Everything here is plain data and files, no training.
"""
from dualmem.utils.errors import UserError


def dataset_classes(cfg):
    """Classes of the configured training manifest, in order of appearance."""
    from dualmem.datasets.builder import locate_manifests
    from dualmem.datasets.manifest import read_manifest

    train_meta, _, _ = locate_manifests(cfg, cfg.dataset.get("classes"))
    seen = dict.fromkeys(r["clsname"] for r in read_manifest(train_meta))
    wanted = cfg.dataset.get("classes")
    if wanted:
        missing = [c for c in wanted if c not in seen]
        if missing:
            raise UserError(f"class {', '.join(repr(c) for c in missing)} not in {train_meta} "
                             f"(classes there: {', '.join(seen)})")
        return list(wanted)
    return list(seen)


CLASS_LISTS = ("no_masks",)  # protocol entries that list class names


def combine(per_class_results, classes, seconds=None):
    """One results dict (the Trainer's format) from the per-class runs. A protocol entry the
    classes share is given once; one that differs (a class resumed alone to more epochs, with
    an override) is given per class, never as the first class's."""
    from dualmem.utils.metrics import summarize

    per_class = {c: per_class_results[c]["per_class"][c] for c in classes}
    protocols = {c: per_class_results[c]["protocol"] for c in classes}
    protocol = {}
    for key in dict.fromkeys(k for p in protocols.values() for k in p):
        values = {c: p[key] for c, p in protocols.items() if key in p}
        first = next(iter(values.values()))
        same = len(values) == len(classes) and all(v == first for v in values.values())
        protocol[key] = first if same else values
        if not same and all(isinstance(v, dict) and list(v) == [c] for c, v in values.items()):
            protocol[key] = {c: v[c] for c, v in values.items()}  # already given by class
        elif not same and key == "overrides":  # a list as in every protocol, class named
            protocol[key] = [f"{c}: {o}" for c, v in values.items() for o in v]
        elif key in CLASS_LISTS:  # lists of class names: the union, in class order
            named = {n for v in values.values() for n in (v or [])}
            protocol[key] = [c for c in classes if c in named]
    protocol.update(classes=list(classes), setting="per-class")
    out = {"protocol": protocol, "per_class": per_class, "mean": summarize(per_class),
           "epoch": {c: per_class_results[c].get("epoch") for c in classes}}
    points = {c: per_class_results[c].get("operating_point", {}).get(c) for c in classes}
    if any(p is not None for p in points.values()):
        out["operating_point"] = {c: p for c, p in points.items() if p is not None}
    if seconds is not None:
        out["seconds"] = {c: round(s, 1) for c, s in seconds.items()}
    return out


def class_record(record, cls, folder=None):
    """A class's own run.json: it can be resumed or evaluated alone with train_val.py. A class
    that has run already keeps its own record (its history, its code version)."""
    from dualmem.utils.run_record import read_record

    own = read_record(folder) if folder is not None else None
    if own is not None:
        return own
    sub = dict(record, class_name=cls, setting="single-class", history=[])
    sub["part_of"] = "train_per_class"
    return sub


def class_config(plan, folder, override=False):
    """The config a class runs under and the changes it undergoes. A class keeps its own
    config (it may have been resumed alone, with an override) unless the sweep's config is
    changed now; the change then applies to every class, each diffed against its own config
    (a class trained to 3 epochs goes 3 -> 2, not the sweep's 1 -> 2). A hand edit of the
    class's config.yaml is such a change too: refused unless ``override``, then recorded."""
    from dualmem.utils.run_plan import load_run_config
    from dualmem.utils.run_record import config_diff, format_changes, hand_edit, read_record

    if not plan.existing or not (folder / "config.yaml").is_file():
        return plan.cfg, []
    own = load_run_config(folder)
    edited = hand_edit(folder, read_record(folder) or {})
    base = edited[0] if edited else own  # the config the class's run.json recorded
    if plan.changes:
        return plan.cfg, config_diff(base, plan.cfg)
    by_hand = config_diff(base, own) if edited else []
    if by_hand and not override:
        raise UserError(f"{folder / 'config.yaml'} was edited by hand since "
                        f"{folder / 'run.json'} recorded it; refused, so that the class's "
                        f"numbers keep meaning what its record says. Changed:\n"
                        f"{format_changes(by_hand)}\nUndo the edit, or add --override to "
                        f"accept it (recorded in {folder / 'run.json'})")
    return own, by_hand


def refuse_shortening(jobs, work_dir, trusted):
    """Before anything trains: a run (``work_dir/<name>``, a class or a sweep's cell) already
    trained past its new trainer.max_epoch cannot get there by resuming."""
    from dualmem.utils.checkpoint import load_checkpoint

    longer = []
    for name, (cfg, changes) in jobs.items():
        last = work_dir / name / "checkpoints" / "last.pth"
        if any(k == "trainer.max_epoch" for k, _, _ in changes) and last.is_file():
            state = load_checkpoint(last, map_location="cpu", trusted=trusted)
            trained = int(state["epoch"]) + (int(state.get("step") or 0) > 0)
            if trained > int(cfg.trainer.max_epoch):
                longer.append(f"{name} has trained {trained} epochs, trainer.max_epoch would "
                              f"be {cfg.trainer.max_epoch}")
    if longer:
        raise UserError(f"resuming {work_dir} refused, nothing was changed: a resume cannot "
                        f"train for fewer epochs than it has ({'; '.join(longer)})")
