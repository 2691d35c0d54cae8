"""One model per class, in turn (the single-class setting; DuMeNet's sweep), one table at the end.

    python tools/train_per_class.py --config experiments/MVTec-AD/uniad/lite.yaml \\
        --data_root DATA/mvtec [--classes bottle cable] [--work_dir RUN]
    python tools/train_per_class.py --config CFG --work_dir RUN --resume    # finish a sweep
    python tools/train_per_class.py --config CFG --work_dir RUN --evaluate  # re-evaluate all

Each class trains in ``<work_dir>/<class>/`` (its own checkpoints, log, results); the sweep
writes ``<work_dir>/results.json`` / ``results.md`` with every class and the unweighted mean.
With --resume, classes that already have results are kept and an interrupted class continues
from its last checkpoint.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._common import (add_config_arg, add_data_args, add_run_args,  # noqa: E402
                           dataset_classes, load_cfg, resolve_work_dir, run_main)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_arg(p)
    add_data_args(p)
    p.add_argument("--classes", nargs="+", default=None,
                   help="classes to train (default: every class of the dataset)")
    p.add_argument("-e", "--evaluate", action="store_true",
                   help="evaluate every class's <class>/checkpoints/best.pth only")
    p.add_argument("--resume", action="store_true",
                   help="keep finished classes, continue an interrupted one")
    add_run_args(p)
    return p.parse_args(argv)


def combine(per_class_results, classes, seconds=None):
    """One results dict (the Trainer's format) from the per-class runs."""
    from utils.metrics import summarize

    per_class = {c: per_class_results[c]["per_class"][c] for c in classes}
    protocol = dict(per_class_results[classes[0]]["protocol"])
    protocol.update(classes=list(classes), setting="per-class")
    out = {"protocol": protocol, "per_class": per_class, "mean": summarize(per_class),
           "best_epoch": {c: per_class_results[c].get("epoch") for c in classes}}
    if seconds is not None:
        out["seconds"] = {c: round(s, 1) for c, s in seconds.items()}
    return out


def run(args):
    from utils.logger import setup_logger
    from utils.misc import resolve_device
    from utils.results import protocol_line, results_table, write_results
    from utils.trainer import Trainer

    cfg = load_cfg(args, classes=args.classes)
    classes = dataset_classes(cfg)
    cfg.dataset["classes"] = classes  # one prepared manifest for the whole sweep
    work_dir = resolve_work_dir(args, pick_latest=args.evaluate or args.resume)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    log = setup_logger(work_dir / "log.txt")
    log.info(f"per-class sweep over {len(classes)} classes: {', '.join(classes)} -> {work_dir}")
    results, seconds = {}, {}
    for i, cls in enumerate(classes, 1):
        sub = work_dir / cls
        done = sub / "results.json"
        if args.resume and done.is_file() and not args.evaluate:
            results[cls] = json.loads(done.read_text(encoding="utf-8"))
            log.info(f"[{i}/{len(classes)}] {cls}: kept finished results from {done}")
            continue
        log.info(f"[{i}/{len(classes)}] {cls}")
        t0 = time.time()
        trainer = Trainer(cfg, sub, device, class_name=cls, progress=not args.no_progress)
        if args.evaluate:
            res = trainer.evaluate(sub / "checkpoints" / "best.pth")
        else:
            if args.resume and (sub / "checkpoints" / "last.pth").is_file():
                trainer.resume()
            res = trainer.fit()
        if res is None:
            raise ValueError(f"class '{cls}' produced no evaluation (trainer.max_epoch 0?)")
        results[cls], seconds[cls] = res, time.time() - t0
        log = setup_logger(work_dir / "log.txt")  # the class's Trainer took the logger over
    combined = combine(results, classes, seconds)
    write_results(combined, work_dir)
    log.info(f"per-class results\n{protocol_line(combined['protocol'])}\n" +
             results_table(combined, fmt="simple"))
    return 0


def main(argv=None):
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
