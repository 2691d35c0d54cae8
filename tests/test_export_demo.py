"""The demo-size export check (issue #16): each demo config (UniAD, DuMeNet, DMAD) trained one
epoch at the demo's size, exported in both formats by tools/export.py, and the exported files,
run on real demo test images through their sidecars, give tools/predict.py's scores.

Only what leaves the exported model's size untouched is cut for time: one epoch, one heat-map
panel per evaluation, the exporter's own parity check on 16 of the 104 test images (the score
comparison below: 12 images, 3 per class), UniAD and DuMeNet share their identical
frozen-feature cache, and DMAD's greedy coreset measures distances in a 16-d random projection
instead of 128-d (the bank keeps its size: ``coreset_ratio`` of the same 240 images' patches).
Input size, architecture, data and bank sizes are the demo's. The demo data is generated under
data/synthetic on first use (gitignored, shared with the demo)."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT
from dualmem.tools import export, predict, train_val
from dualmem.utils import detector as det
from dualmem.utils import export_parity as parity
from dualmem.utils.exported_model import FORMATS

DEMO = ROOT / "experiments" / "demo"
CONFIGS = {"uniad": "config.yaml", "dumenet": "dumenet.yaml", "dmad": "dmad.yaml"}
DEMO_DATA = ROOT / "data" / "synthetic"
PER_CLASS = 3  # test images per class compared (the good ones and defects, spread)


@pytest.fixture(scope="module")
def demo_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("export_demo")


def train_demo(tmp, kind):
    run = tmp / f"run_{kind}"
    opts = ["trainer.max_epoch=1", "trainer.val_freq_epoch=1", "evaluator.vis.max_images=1",
            # UniAD and DuMeNet share backbone, neck and input: their features are cached once
            f"trainer.feature_cache_dir={(tmp / 'feature_cache').as_posix()}"]
    if kind == "dmad":
        opts.append("net.2.kwargs.coreset_proj_dim=16")  # coreset speed only, same bank sizes
    assert train_val.main(["--config", str(DEMO / CONFIGS[kind]), "--work_dir", str(run),
                           "--no_progress", "--device", "cpu", "--opts", *opts]) == 0
    return run


def demo_subset(dest):
    """PER_CLASS test images of every demo class (spread over good and defect folders),
    copied as ``<class>/test/<defect>/x.png`` for predict.py (class from the path)."""
    classes = sorted(p.name for p in DEMO_DATA.iterdir() if (p / "test").is_dir())
    assert len(classes) >= 4, classes
    rels = []
    for cls in classes:
        files = sorted(p.relative_to(DEMO_DATA)
                       for p in (DEMO_DATA / cls / "test").glob("*/*.png"))
        picked = [files[i] for i in np.linspace(0, len(files) - 1, PER_CLASS).round().astype(int)]
        for rel in picked:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(DEMO_DATA / rel, dest / rel)
            rels.append(rel.as_posix())
    return rels


def read_scores(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert not any(r.get("error") for r in rows), rows
    return {r["file"]: float(r["score"]) for r in rows}


def allowed_tie_noise(run, paths, idx):
    """The exporter's one allowance (utils/export_parity.py compare): a score may be off by up
    to twice what the eager model itself moves when its input moves by float32 rounding (a k-NN
    near-tie), measured as the exporter does (``eager_noise``, same eps, trials and seed)."""
    model, cfg, state = det.load_model(det.resolve_checkpoint(str(run)), torch.device("cpu"))
    reference = parity.eager_reference(model, cfg, state)
    maps, scores = parity.eager_outputs(reference, paths)
    return 2 * parity.eager_noise(reference, paths, maps, scores, idx)[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_demo_export_matches_predict(demo_tmp, tmp_path, kind, capsys):
    run = train_demo(demo_tmp, kind)
    ckpt = run / "checkpoints" / "last.pth"
    inp = tmp_path / "in"
    rels = demo_subset(inp)
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(inp), "--output",
                         str(tmp_path / "out"), "--no_images", "--device", "cpu"]) == 0
    by_predict = read_scores(tmp_path / "out" / "predictions.csv")
    ref = np.array([by_predict[r] for r in rels])
    paths = [str(inp / r) for r in rels]
    scale = max(float(np.abs(ref).max()), 1e-12)

    for fmt, (ext, _, _) in FORMATS.items():
        capsys.readouterr()
        code = export.main(["--work_dir", str(run), "--format", fmt, "--device", "cpu",
                            "--max_images", "16"])
        out, err = capsys.readouterr()
        assert code == 0, f"export {fmt} exit {code}:\n{out}\n{err}"
        path = run / "export" / f"last{ext}"
        side = det.sidecar_path(path)
        assert path.is_file() and path.stat().st_size > 0 and side.is_file()
        meta = json.loads(side.read_text(encoding="utf-8"))
        assert meta["format"] == fmt and meta["file"] == path.name
        assert meta["preprocessing"]["input_size"] == [224, 224]
        assert sorted(meta["classes"]) == sorted({r.split("/")[0] for r in rels})
        limit = meta["parity"]["limits"]["score_rel"]
        assert limit == pytest.approx(1e-4)

        _, scores = det.run_exported(path, paths)
        rel = np.abs(scores.astype(np.float64) - ref) / scale
        off = np.flatnonzero(rel > limit)
        if off.size and kind == "dmad":  # k-NN near-ties: the exporter's recorded allowance
            noise = allowed_tie_noise(run, paths, off)
            off = [i for i in off if abs(float(scores[i]) - ref[i]) > noise[i]]
        assert not len(off), (
            f"{kind} {fmt}: scores differ from predict.py by more than {limit:g} of the max "
            f"({scale:.6g}): " + ", ".join(f"{rels[i]} predict {ref[i]:.7g} exported "
                                             f"{float(scores[i]):.7g}" for i in off))
