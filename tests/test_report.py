"""The pictures and report.html of an evaluated run folder (utils/report.py), rendered with a
real headless browser, and the TensorBoard step axis of a tiny training run.

The browser test needs Chromium (Debian: ``apt-get install -y chromium``). Without it the test
fails, saying so; DUALMEM_NO_BROWSER=1 turns that into a skip that prints the reason."""
import base64
import html.parser
import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest
import yaml

from conftest import ROOT, synthetic_dataset, tiny_net
from test_plots import make_inference
from dualmem.utils.evaluator import compute_thresholds, metrics_from_inference
from dualmem.utils.metrics import METRIC_NAMES
from dualmem.utils.report import REPORT_NAME, verdicts, write_evaluation_pictures
from dualmem.utils.results import protocol_line


# ----------------------------------------------------------------------------- helpers
class FakeDataset:
    """What ``visualize.display_image`` needs: records, path_of, input_size (and resize)."""

    def __init__(self, root, inf, size):
        self.root, self.input_size, self.resize = Path(root), (size, size), "cv2_linear"
        self.records = []
        rng = np.random.default_rng(0)
        for name in inf["filename"]:
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(path), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            self.records.append({"filename": name})

    def path_of(self, name):
        return str(self.root / name)


class RecordingWriter:
    def __init__(self):
        self.images = []

    def add_image(self, tag, img, step, dataformats="CHW"):
        self.images.append((tag, np.asarray(img), step, dataformats))


class ImgSources(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.src, self.files = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs).get("src"))
            self.files.append(dict(attrs).get("data-file"))


def img_sources(page):
    """The full-size file each <img> stands for (``data-file``, relative to the report); the
    pictures themselves are embedded (checked here: every src is a data: URI)."""
    p = ImgSources()
    p.feed(page)
    assert all(s and s.startswith("data:image/") for s in p.src), \
        [s[:60] for s in p.src if not (s or "").startswith("data:image/")]
    return p.files


def decode_data_uri(src):
    head, _, payload = src.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
    return cv2.imdecode(np.frombuffer(base64.b64decode(payload), np.uint8), cv2.IMREAD_COLOR)


def evaluation(tmp_path, seed=0):
    inf = make_inference(seed=seed, counts=(10, 5))
    # a name needing URL quoting: the report must still find it
    inf["filename"][1] = "a/test/crack/with space#1.png"
    per_class, mean = metrics_from_inference(inf, METRIC_NAMES, ["a", "b"])
    results = {"protocol": {"dataset": "hand-made", "classes": ["a", "b"], "setting": "unified",
                            "epochs": 1}, "per_class": per_class, "mean": mean}
    thresholds = compute_thresholds(inf, {"reduction": "max", "kernel": 4}, ["a", "b"])
    # a threshold low in class a's scores: some normal images are misclassified
    sel = np.flatnonzero(np.asarray(inf["clsname"]) == "a")
    thresholds["per_class"]["a"]["image_threshold"] = float(np.sort(inf["score"][sel])[2])
    dataset = FakeDataset(tmp_path / "images", inf, inf["maps"].shape[-1])
    return inf, thresholds, dataset, results


def chromium():
    """The Chromium binary, or fail (skip only with DUALMEM_NO_BROWSER=1)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    reason = "chromium not found: install it with `apt-get install chromium`"
    if os.environ.get("DUALMEM_NO_BROWSER") == "1":
        print(f"DUALMEM_NO_BROWSER=1: skipping the browser check ({reason})")
        pytest.skip(f"DUALMEM_NO_BROWSER=1: {reason}")
    pytest.fail(f"{reason} (or set DUALMEM_NO_BROWSER=1 to skip this check)")


def browse(exe, page, tmp_path, *extra):
    profile = tmp_path / "chromium-profile"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


def check_report_in_browser(report, tmp_path, expected_images, shot_name="report.png"):
    """The page alone (copied into an empty folder, as when it is mailed) renders in
    Chromium; every <img> of the rendered DOM is an embedded picture that decodes and names
    the full-size file written beside the original; a screenshot of the page is not blank."""
    exe = chromium()
    alone = tmp_path / "mailed" / report.name
    alone.parent.mkdir(exist_ok=True)
    shutil.copy(report, alone)
    dom = browse(exe, alone, tmp_path, "--dump-dom")
    parser = ImgSources()
    parser.feed(dom)
    assert len(parser.src) == expected_images, (len(parser.src), expected_images)
    for src, file in zip(parser.src, parser.files):
        img = decode_data_uri(src)
        assert img is not None and img.size > 0, f"the picture of {file} does not decode"
        assert (report.parent / file).is_file(), f"{file}: no full-size file beside the report"
    shot = tmp_path / shot_name
    browse(exe, alone, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600",
           "--hide-scrollbars")
    img = cv2.imread(str(shot))
    assert img is not None and img.std() > 5, "the screenshot of report.html is blank"
    return parser.files


# ----------------------------------------------------------------------------- fast tests
def test_pictures_report_and_tensorboard_images(tmp_path):
    inf, thresholds, dataset, results = evaluation(tmp_path)
    writer = RecordingWriter()
    out = tmp_path / "eval"
    paths = write_evaluation_pictures(inf, thresholds, dataset, out, results, writer=writer,
                                      step=7, vis_cfg={"normalize": "global"})
    assert paths[-1] == out / REPORT_NAME and all(Path(p).is_file() for p in paths)
    for cls in ("a", "b"):
        for kind in ("roc", "pr", "pro", "hist"):
            assert cv2.imread(str(out / "plots" / cls / f"{kind}.png")) is not None
    panels = [p for p in paths if "vis" in Path(p).relative_to(out).parts]
    assert len(panels) == len(inf["filename"])
    # TensorBoard: one HWC image of the four curves per class, at the given step
    assert [(t, s, f) for t, _, s, f in writer.images] == [("val/curves/a", 7, "HWC"),
                                                             ("val/curves/b", 7, "HWC")]
    for _, img, _, _ in writer.images:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.shape[1] == 4 * 400

    page = (out / REPORT_NAME).read_text(encoding="utf-8")
    assert protocol_line(results["protocol"]) in page
    mean_auroc = f"{100 * results['mean']['image_auroc']:.2f}"
    assert mean_auroc in page and "<table>" in page
    sources = img_sources(page)
    assert len(sources) == 8 + len(inf["filename"])
    # panels: per class, misclassified first, then by decreasing score
    pred, wrong = verdicts(inf, thresholds)
    index = {f"vis/{c}/{Path(f).parent.name}/{Path(f).stem}.png": i
             for i, (c, f) in enumerate(zip(inf["clsname"], inf["filename"]))}
    shown = [index[unquote(s)] for s in sources if s.startswith("vis/")]
    assert sorted(shown) == list(range(len(inf["filename"])))
    names = np.asarray(inf["clsname"])
    assert any(wrong) and not all(wrong)
    for cls in ("a", "b"):
        got = [i for i in shown if names[i] == cls]
        t = thresholds["per_class"][cls]["image_threshold"]
        want = sorted(got, key=lambda i: (not ((inf["score"][i] >= t) != (inf["label"][i] > 0)),
                                          -inf["score"][i]))
        assert got == want
    # the panels' heading states the verdict: a misclassified one is marked WRONG
    i_wrong = shown[0]
    assert wrong[i_wrong] and "WRONG" in page


def test_max_images_keeps_the_misclassified(tmp_path):
    inf, thresholds, dataset, results = evaluation(tmp_path, seed=3)
    _, wrong = verdicts(inf, thresholds)
    n_wrong_a = sum(w for w, c in zip(wrong, inf["clsname"]) if c == "a")
    assert n_wrong_a >= 1
    out = tmp_path / "eval"
    write_evaluation_pictures(inf, thresholds, dataset, out, results,
                              vis_cfg={"max_images": n_wrong_a + 1})
    sources = [s for s in img_sources((out / REPORT_NAME).read_text()) if s.startswith("vis/")]
    a_rows = [s for s in sources if s.startswith("vis/a/")]
    assert len(a_rows) == n_wrong_a + 1
    wrong_names = {f"vis/a/{Path(f).parent.name}/{Path(f).stem}.png"
                   for f, w, c in zip(inf["filename"], wrong, inf["clsname"]) if w and c == "a"}
    assert {unquote(s) for s in a_rows[:n_wrong_a]} == wrong_names


def test_tensorboardx_writer_gets_readable_curve_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboardX import SummaryWriter

    inf, thresholds, dataset, results = evaluation(tmp_path)
    writer = SummaryWriter(str(tmp_path / "events"))
    write_evaluation_pictures(inf, thresholds, None, tmp_path / "eval", results, writer=writer,
                              step=3)
    writer.close()
    acc = EventAccumulator(str(tmp_path / "events"), size_guidance={"images": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"val/curves/a", "val/curves/b"}
    ev = acc.Images("val/curves/a")[0]
    assert ev.step == 3
    img = cv2.imdecode(np.frombuffer(ev.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (330, 1600, 3)


def test_report_renders_in_headless_chromium(tmp_path):
    inf, thresholds, dataset, results = evaluation(tmp_path)
    out = tmp_path / "eval"
    write_evaluation_pictures(inf, thresholds, dataset, out, results)
    check_report_in_browser(out / REPORT_NAME, tmp_path, 8 + len(inf["filename"]))


def test_missing_browser_fails_unless_opted_out(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("DUALMEM_NO_BROWSER", raising=False)
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        chromium()
    monkeypatch.setenv("DUALMEM_NO_BROWSER", "1")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        chromium()


# ----------------------------------------------------------------------------- tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two epochs of a tiny unified run, evaluated after each; train/* logged only at each
    epoch's last step (print_freq_step larger than an epoch)."""
    from dualmem.tools import train_val

    tmp = tmp_path_factory.mktemp("tiny")
    cfg = {
        "_base_": str(ROOT / "configs" / "runtime.yaml"),
        "random_seed": 5,
        "dataset": synthetic_dataset(tmp / "data", seed=2),
        "trainer": {"max_epoch": 2, "val_freq_epoch": 1, "print_freq_step": 1000,
                    "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
        "evaluator": {"vis": {"normalize": "global", "tensorboard_panels": 2}},
        "net": tiny_net(),
    }
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    work = tmp / "run"
    assert train_val.main(["--config", str(cfg_path), "--work_dir", str(work), "--no_progress",
                           "--device", "cpu"]) == 0
    return cfg_path, work


@pytest.mark.slow
def test_report_of_a_tiny_run_renders_in_chromium(tiny_run, tmp_path):
    import torch

    from dualmem.utils.config import load_config
    from dualmem.utils.evaluator import run_inference
    try:
        from dualmem.utils.engine import Trainer
    except ImportError:  # before the engine package
        from dualmem.utils.trainer import Trainer

    cfg_path, work = tiny_run
    trainer = Trainer(load_config(cfg_path), tmp_path / "check", torch.device("cpu"),
                      progress=False)
    trainer.load_state(torch.load(work / "checkpoints" / "last.pth", weights_only=True),
                       resume=False)
    inf = run_inference(trainer.model, trainer.test_loader, trainer.device, trainer.score_cfg,
                        progress=False)
    classes = sorted(set(inf["clsname"]))
    thresholds = compute_thresholds(inf, trainer.score_cfg, classes)
    results = json.loads((work / "results.json").read_text())
    out = work / "evaluations" / "report-test"
    paths = write_evaluation_pictures(inf, thresholds, trainer.test_set, out, results)
    trainer.close()
    assert len(paths) == 4 * len(classes) + len(inf["filename"]) + 1
    page = (out / REPORT_NAME).read_text()
    assert protocol_line(results["protocol"]).split(";")[0].split(",")[0] in page
    check_report_in_browser(out / REPORT_NAME, tmp_path, 4 * len(classes) + len(inf["filename"]))


@pytest.mark.slow
def test_tensorboard_val_scalars_share_the_training_step_axis(tiny_run):
    """val/* (scalars and images) and train/epoch_loss of an evaluation after epoch e are at
    the global step of e's last training step, the axis of train/loss and train/lr."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, work = tiny_run
    acc = EventAccumulator(str(work / "events"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    # print_freq_step > steps per epoch: train/loss is written at each epoch's last step only
    last_steps = [e.step for e in acc.Scalars("train/loss")]
    assert len(last_steps) == 2 and last_steps[0] > 0 and last_steps[1] == 2 * last_steps[0] + 1
    assert [e.step for e in acc.Scalars("train/lr")] == last_steps
    val = [t for t in tags["scalars"] if t.startswith("val/")]
    assert "val/mean_pixel_auroc" in val
    wrong = {t: [e.step for e in acc.Scalars(t)] for t in val + ["train/epoch_loss"]
             if [e.step for e in acc.Scalars(t)] != last_steps}
    # images: the per-epoch panels at every evaluation, the curves of the final one
    wrong.update({t: [e.step for e in acc.Images(t)] for t in tags["images"]
                  if t.startswith("val/") and [e.step for e in acc.Images(t)] !=
                  (last_steps[-1:] if t.startswith("val/curves/") else last_steps)})
    assert any(t.startswith("val/curves/") for t in tags["images"])
    assert not wrong, (f"expected every val/* and train/epoch_loss at the epochs' last global "
                       f"steps {last_steps}, got {wrong}")
