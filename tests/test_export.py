"""tools/export.py and utils/exporting.py (ONNX / TorchScript with a sidecar, refused unless it
reproduces the eager model: utils/export_parity.py) and utils/detector.py
(load_detector(...).predict(...), run_exported)."""
import csv
import os
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dualmem import models  # noqa: F401  (registers everything)
from conftest import ROOT, synthetic_dataset, tiny_dmad_net, tiny_net
from dualmem.models.model_builder import ModelHelper
from dualmem.tools import export, predict, train_val
from dualmem.utils import detector as det
from dualmem.utils import export_parity as parity
from dualmem.utils import exporting
from dualmem.utils.exported_model import FORMATS
from dualmem.utils.metrics import image_score_from_map

KINDS = ("uniad", "dumenet", "dmad")
README_MARKER = "<!-- api-example -->"
API_PAGE = "docs/user/export-api.md"  # where the README's API example lives now


def dumenet_net():
    net = tiny_net()
    net[2]["type"] = "models.reconstructions.UniADMemory"
    net[2]["kwargs"].update(memory_mode="both", fusion_mode="gate", channel_memory_size=6,
                            spatial_memory_size=6, ssim_mode="local", ssim_window=7)
    return net


def dmad_seen_net():
    """DMAD-lite's score: normal distance + bounded correction + the seen-anomaly bonus."""
    net = tiny_dmad_net()
    net[2]["kwargs"].update(score="normal_plus_correction", include_query=False,
                            knowledge=["distance", "real_distance"], seen_bonus=2.0)
    return net


NETS = {"uniad": tiny_net, "dumenet": dumenet_net, "dmad": tiny_dmad_net,
        "dmad_seen": dmad_seen_net}


def random_model(kind, size=64):
    """A random-weight eval-mode model; DMAD gets small random banks."""
    torch.manual_seed(0)
    model = ModelHelper(NETS[kind](), input_size=[size, size]).eval()
    if kind.startswith("dmad"):
        head, g = model.head, torch.Generator().manual_seed(1)
        head._set_bank("normal", torch.randn(40, head.dim, generator=g), torch.arange(40),
                       torch.zeros(40))
        head._set_bank("abnormal", torch.randn(20, head.dim, generator=g) + 1,
                       torch.arange(20), torch.zeros(20), torch.zeros(20))
    if kind == "dmad_seen":  # banks from the net's own patches, half the abnormal ones real
        x = torch.randn(2, 3, size, size, generator=g)
        with torch.no_grad():
            feats = model({"image": x}, stop=2)["feature_align"]
        q = feats.permute(0, 2, 3, 1).reshape(-1, head.dim)[torch.randperm(
            feats.shape[0] * feats.shape[2] * feats.shape[3], generator=g)]
        head._set_bank("normal", q[:40], torch.arange(40), torch.zeros(40))
        head._set_bank("abnormal", q[40:60], torch.arange(20), torch.zeros(20),
                       torch.arange(20) % 2)  # pseudo / real
        head.dist_scale.fill_(float(torch.cdist(q[60:], q[:40]).min(1).values.mean()))
    return model


# ----------------------------------------------------------------------------- fast units
@pytest.mark.parametrize("reduction,kernel", [("max", 16), ("max", 1), ("max", 99),
                                              ("mean", 16), ("std", 16), ("topk", 16)])
def test_image_score_in_the_graph_equals_the_metric(reduction, kernel):
    maps = torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(2)) ** 4
    ours = exporting.image_score_graph(maps, reduction, kernel, topk=0.013).numpy()
    ref = image_score_from_map(maps.numpy(), reduction, kernel, topk=0.013)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_compare_reports_rank_changes_but_not_ties():
    names = ["a", "b", "c"]
    maps = np.ones((3, 4, 4), np.float32)
    same = parity.compare(names, maps, [1.0, 2.0, 3.0], maps, [1.0, 2.0, 3.0])
    assert not same["fail"] and same["rank_changes"] == 0
    tie = parity.compare(names, maps, [1.0, 1.0 + 1e-9, 3.0], maps, [1.0 + 2e-9, 1.0, 3.0])
    assert not tie["fail"]
    flipped = parity.compare(names, maps, [1.0, 1.1, 3.0], maps, [1.1, 1.0, 3.0])
    assert flipped["rank_changes"] == 1 and flipped["suspects"] == [0, 1]
    assert flipped["fail"][0].startswith("rank  a scored below b"), flipped["fail"]
    off = parity.compare(names, maps, [1.0, 2.0, 3.0], maps * 1.001, [1.0, 2.0, 3.0])
    assert [line.split()[0] for line in off["fail"]] == ["map"] * 3


def test_compare_tolerates_only_what_the_eager_model_does_itself():
    """A map off by 2e-4 is refused unless the eager model moves by half that or more when its
    input moves by float32 rounding (a k-NN tie): here 1.5e-4 for a, 1e-6 for b."""
    names = ["a", "b"]
    maps = np.ones((2, 4, 4))
    off = maps.copy()
    off[:, 0, 0] += 2e-4
    res = parity.compare(names, maps, [1.0, 2.0], off, [1.0, 2.0],
                         noise=(np.array([1.5e-4, 1e-6]), np.zeros(2)))
    assert len(res["tolerated"]) == 1 and "a" in res["tolerated"][0]
    assert len(res["fail"]) == 1 and res["fail"][0].endswith("b (eager itself: 1.0e-06)")
    res = parity.compare(names, maps, [1.0, 1.1], maps, [1.1, 1.0],
                         noise=(np.zeros(2), np.array([0.06, 0.06])))
    assert not res["fail"] and res["rank_changes"] == 1 and res["tolerated"]


def test_config_hash_is_canonical():
    a = {"x": 1, "net": [{"type": "A", "kwargs": {"p": 1.5, "q": None}}]}
    b = {"net": [{"kwargs": {"q": None, "p": 1.5}, "type": "A"}], "x": 1}
    assert exporting.config_sha256(a) == exporting.config_sha256(b)
    assert exporting.config_sha256(a) != exporting.config_sha256({**a, "x": 2})


def test_one_inference_path():
    """Run the model, reduce to an image score, decide: each step is written once (issue #28).
    A model's output becomes a map only in utils.inference.forward_maps (evaluation, the
    Detector, predict.py, the exporter's reference and graph call it); the score reduction is
    called by the Detector and evaluation only; a verdict is made only by Decider.judge. The
    tools are thin command lines over library modules (benchmarks time the raw forward)."""
    files = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
             for p in [*(ROOT / "utils").glob("*.py"), *(ROOT / "tools").glob("*.py")]
             if not p.name.startswith(("benchmark", "_bench"))}

    def where(pattern):
        return sorted(f for f, text in files.items() if re.search(pattern, text))

    assert where(r'\)\["pred"\]') == ["utils/inference.py"]
    assert where(r"torch\.autocast\(") == ["utils/inference.py"]
    assert where(r"(?<!def )(?<!metrics\.)image_score_from_map\(") == \
        ["utils/detector.py", "utils/evaluator.py"]
    assert where(r">= image_t\b") == ["utils/detector.py"]
    for tool in ("tools/predict.py", "tools/export.py"):
        text = files[tool]
        assert len(text.splitlines()) < 150, tool
        assert set(re.findall(r"^\s*from (?:dualmem\.)?(tools\.\w+) import", text, re.M)) <= \
            {"tools._common"}


@pytest.mark.parametrize("resize", ["cv2_linear", "antialias"])
def test_preprocess_is_the_training_datasets(tmp_path, resize):
    """predict.py, load_detector and the exported-model runner feed the model exactly the
    tensor the training / evaluation dataset makes from the same file."""
    import cv2

    from dualmem.datasets.manifest_dataset import ManifestDataset

    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "x.png"), rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ds = ManifestDataset([{"filename": "x.png", "label": 0, "clsname": "c"}], str(tmp_path),
                         (32, 48), mean, std, resize=resize)
    spec = det.InputSpec((32, 48), mean, std, "RGB", resize)
    assert torch.equal(det.preprocess(tmp_path / "x.png", spec), ds[0]["image"])
    batch, sizes, sources, single = det.as_batch([str(tmp_path / "x.png")] * 2, spec)
    assert batch.shape == (2, 3, 32, 48) and sizes == [(50, 70)] * 2 and not single
    assert torch.equal(batch[1], ds[0]["image"])
    with pytest.raises(ValueError, match="preprocessed batch"):
        det.as_batch(torch.zeros(1, 3, 10, 10), spec)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("kind", KINDS + ("dmad_seen",))
def test_exported_graph_matches_eager_for_any_batch(tmp_path, kind, fmt):
    model = random_model(kind)
    if kind == "dmad_seen":  # the bonus is in the graph: some patch gets it
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            feats = model({"image": x}, stop=2)["feature_align"]
            parts = model.head.knowledge_parts(
                feats.permute(0, 2, 3, 1).reshape(-1, model.head.dim))
        assert float(model.head.seen_evidence(parts, 2, *feats.shape[-2:]).max()) > 0
    graph = exporting.ExportGraph(exporting.exportable_copy(model), {"reduction": "max", "kernel": 8})
    path = tmp_path / f"m{FORMATS[fmt][0]}"
    gen = torch.Generator().manual_seed(3)
    exporting.write_exported(graph, torch.randn(2, 3, 64, 64, generator=gen), fmt, path)
    spec = det.InputSpec((64, 64), (0.5,) * 3, (0.25,) * 3)
    meta = {"format": fmt, "preprocessing": spec.to_dict()}
    runner = det.ExportedModel(path, meta)
    for n in (1, 3):  # not the traced batch size
        x = torch.randn(n, 3, 64, 64, generator=gen)
        with torch.no_grad():
            ref = model({"image": x})["pred"][:, 0].numpy()
        maps, scores = det.run_exported(runner, x)
        assert maps.shape == (n, 64, 64) and scores.shape == (n,)
        assert np.abs(maps - ref).max() <= 1e-4 * np.abs(ref).max()
        np.testing.assert_allclose(scores, image_score_from_map(ref, "max", 8), rtol=1e-4)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("export_data") / "data"


def train(tmp, data, kind):
    """A tiny 2-class run trained one epoch and evaluated (thresholds in the checkpoint).
    Test images are 80 px, the input 64 px: the resize is part of every comparison."""
    cfg = {
        "_base_": str(ROOT / ("experiments/demo/dmad.yaml" if kind == "dmad"
                              else "configs/runtime.yaml")),
        "random_seed": 5,
        "dataset": dict(synthetic_dataset(data, seed=4, image_size=80, num_train=6,
                                          num_test_good=3, num_test_defect=1),
                        input_size=[64, 64]),
        "trainer": {"max_epoch": 1, "val_freq_epoch": 1},
        "net": NETS[kind](),
    }
    if kind == "dumenet":
        cfg["evaluator"] = {"image_score": {"reduction": "max", "kernel": 8}}
    path = tmp / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp / f"run_{kind}"
    assert train_val.main(["--config", str(path), "--work_dir", str(run), "--no_progress",
                           "--device", "cpu"]) == 0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("export_runs")
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = train(tmp, data_root, kind)
        return made[kind]

    return get


def dataset_test_images(data_root):
    return sorted(data_root.glob("*/test/*/*.png"))


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_export_reproduces_predict_and_the_detector(runs, data_root, tmp_path, kind, capsys):
    run = runs(kind)
    ckpt = run / "checkpoints" / "last.pth"
    state = torch.load(ckpt, weights_only=True)
    files = dataset_test_images(data_root)
    # predict.py on unlabelled copies, class from the folder names
    inp = tmp_path / "in"
    for p in files:
        (inp / p.relative_to(data_root)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, inp / p.relative_to(data_root))
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(inp), "--output",
                         str(tmp_path / "out"), "--no_images", "--device", "cpu"]) == 0
    by_predict = {r["file"]: float(r["score"]) for r in read_csv(tmp_path / "out" /
                                                                   "predictions.csv")}
    ref = np.array([by_predict[p.relative_to(data_root).as_posix()] for p in files])

    detector = det.load_detector(run)
    results = detector.predict([str(p) for p in files])
    np.testing.assert_allclose([r.score for r in results], ref, rtol=1e-6)

    for fmt, (ext, _, _) in FORMATS.items():
        out = tmp_path / f"model{ext}"
        assert export.main(["--work_dir", str(run), "--format", fmt, "--output", str(out)]) == 0
        assert "score order unchanged" in capsys.readouterr().out
        meta = json.loads(det.sidecar_path(out).read_text())
        assert meta["format"] == fmt and meta["file"] == out.name
        assert meta["onnx_opset"] == (exporting.ONNX_OPSET if fmt == "onnx" else None)
        pre = meta["preprocessing"]
        assert pre["input_size"] == [64, 64] and pre["resize"] == "antialias"
        assert pre["pixel_mean"] == pytest.approx(list(state["pixel_mean"]))
        assert pre["pixel_std"] == pytest.approx(list(state["pixel_std"]))
        assert meta["thresholds"]["per_class"].keys() == state["thresholds"]["per_class"].keys()
        assert meta["thresholds"]["global"]["image_threshold"] == \
            pytest.approx(state["thresholds"]["global"]["image_threshold"])
        assert meta["classes"] == ["disc", "weave"]
        assert meta["image_score"]["in_graph"] is True
        assert meta["image_score"]["reduction"] == {"uniad": "max", "dumenet": "max",
                                                    "dmad": "topk"}[kind]
        assert meta["config_sha256"] == exporting.config_sha256(state["config"])
        assert meta["dualmem_version"] and meta["parity"]["limits"]["map_rel"] == 1e-4
        maps, scores = det.run_exported(out, [str(p) for p in files])
        assert maps.shape == (len(files), 64, 64)
        np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        # the sidecar reproduces the in-graph score from the map
        rule = {k: meta["image_score"][k] for k in ("reduction", "kernel", "topk")}
        np.testing.assert_allclose(image_score_from_map(maps, **rule), scores, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("breakage", ["sidecar_mean", "graph"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_export_refuses_a_model_that_differs(runs, tmp_path, monkeypatch, capsys, breakage,
                                             fmt):
    run = runs("uniad")
    if breakage == "sidecar_mean":  # the graph is right, the preprocessing it documents is not
        real = exporting.sidecar_preprocessing

        def shifted(spec):
            d = real(spec)
            d["pixel_mean"] = [m + 0.05 for m in d["pixel_mean"]]
            return d

        monkeypatch.setattr(exporting, "sidecar_preprocessing", shifted)
    else:  # a graph whose maps are 0.1 % off
        real_forward = exporting.ExportGraph.forward

        def scaled(self, image):
            maps, scores = real_forward(self, image)
            return maps * 1.001, scores

        monkeypatch.setattr(exporting.ExportGraph, "forward", scaled)
    out = tmp_path / "sub" / f"model{FORMATS[fmt][0]}"
    assert export.main(["--work_dir", str(run), "--format", fmt, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "nothing written" in err and "map " in err, err
    assert not out.exists() and not det.sidecar_path(out).exists()
    assert not (tmp_path / "sub").exists()


@pytest.mark.slow
def test_export_errors_exit_2(runs, tmp_path, capsys):
    assert export.main(["--work_dir", str(tmp_path / "nowhere"), "--format", "onnx"]) == 2
    assert "no run folder or checkpoint" in capsys.readouterr().err
    run = runs("uniad")
    assert export.main(["--work_dir", str(run), "--format", "onnx", "--images",
                        str(tmp_path)]) == 2
    assert "no image files" in capsys.readouterr().err


@pytest.mark.slow
def test_detector_thresholds_inputs_and_outputs(runs, data_root):
    run = runs("uniad")
    detector = det.load_detector(run / "checkpoints" / "last.pth")
    state = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    th = state["thresholds"]
    path = dataset_test_images(data_root)[0]
    pooled = detector.predict(path)
    assert pooled.threshold_from == "global:f1(test set)" and pooled.class_name is None
    assert pooled.image_threshold == th["global"]["image_threshold"]
    assert pooled.is_anomalous == (pooled.score >= th["global"]["image_threshold"])
    assert pooled.anomaly_map.shape == (80, 80) and pooled.mask.dtype == bool
    assert np.array_equal(pooled.mask, pooled.anomaly_map >= th["global"]["pixel_threshold"])
    cls = detector.predict(str(path), class_name="weave")
    assert cls.threshold_from == "class:f1(test set)" and cls.class_name == "weave"
    assert cls.image_threshold == th["per_class"]["weave"]["image_threshold"]
    assert cls.score == pooled.score
    explicit = detector.predict(path, threshold=-1.0)
    assert explicit.threshold_from == "explicit" and explicit.is_anomalous is True
    with pytest.raises(ValueError, match="no thresholds"):
        detector.predict(path, class_name="nope")
    import cv2

    array = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert detector.predict(array).score == pooled.score
    batch = det.as_batch([array, array], detector.spec)[0]
    from_tensor = detector.predict(batch)
    assert len(from_tensor) == 2 and from_tensor[0].anomaly_map.shape == (64, 64)
    assert from_tensor[0].score == pytest.approx(pooled.score, rel=1e-6)


def readme_api_example():
    """The python block that follows the ``<!-- api-example -->`` line in docs/user/export-api.md."""
    text = (ROOT / API_PAGE).read_text(encoding="utf-8")
    assert README_MARKER in text, f"{API_PAGE} has no '{README_MARKER}' line before the API example"
    after = text.split(README_MARKER, 1)[1]
    block = re.match(r"\s*```python\n(.*?)\n```", after, re.S)
    assert block, f"no ```python block right after '{README_MARKER}' in {API_PAGE}"
    return block.group(1)


@pytest.mark.slow
def test_readme_api_example_runs(runs, tmp_path):
    """The API example as a user runs it: a fresh interpreter in a folder of their own that
    holds its own ``utils`` and ``models`` packages, with only the README's install behind it."""
    import subprocess
    import sys

    run = runs("uniad")
    user = tmp_path / "my_project"
    for name in ("utils", "models"):
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text(f"WHO = 'mine: {name}'\n")
    code = re.sub(r"\bRUN\b", str(run).replace("\\", "/"), readme_api_example())
    code += ("\nimport dualmem.utils.detector as d, utils, models\n"
             "print('USER', utils.WHO, '|', models.WHO)\nprint('DUALMEM', d.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=user, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "USER mine: utils | mine: models" in proc.stdout
    where = proc.stdout.split("DUALMEM ", 1)[1].strip()
    assert Path(where).resolve().is_relative_to(ROOT), (
        f"dualmem is imported from {where}, not this checkout: run `pip install -e .` here")
    assert len(proc.stdout.splitlines()) >= 4  # the example's own prints came out
