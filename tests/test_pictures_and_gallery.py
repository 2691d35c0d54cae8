"""Issue #26, the pictures side: heat maps on one fixed scale per class with the threshold at the
middle of a titled, ticked colour bar; headings wrapped, never clipped; "no mask" panels;
report.html self-contained (mailable) with the departures folded; predict.py's run folders,
progress bar, gallery, greyscale rule, clean refusals; collect_results without a departures
column."""
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, synthetic_dataset, tiny_dmad_net, tiny_net
from test_report import FakeDataset, ImgSources, browse, chromium, decode_data_uri
from dualmem.utils import visualize as V
from dualmem.utils.report import REPORT_NAME, write_evaluation_pictures

FONT = cv2.FONT_HERSHEY_SIMPLEX


def jet(frac):
    """The JET colour (RGB) of a normalised value, as OpenCV draws it."""
    u8 = np.uint8(round(frac * 255))
    return cv2.applyColorMap(np.array([[u8]], np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1].astype(int)


def issue_case(tmp_path, n=2):
    """The issue's numbers: calibration range 0.01..0.5 (the worst test defect), image
    threshold 0.0325; image 0 has a defect at 0.0487 on a 0.02 background, the others are flat."""
    size = 32
    maps = np.full((n, size, size), 0.02, np.float32)
    maps[0, 8:20, 8:20] = 0.0487
    inf = {"filename": [f"a/test/{'crack' if i == 0 else 'good'}/{i:03d}.png" for i in range(n)],
           "clsname": ["a"] * n, "label": np.array([1] + [0] * (n - 1)), "maps": maps,
           "masks": np.zeros((n, size, size), np.uint8), "index": np.arange(n),
           "score": np.array([0.0487] + [0.02] * (n - 1))}
    inf["masks"][0, 8:20, 8:20] = 1
    thresholds = {"image_score": {"reduction": "max", "kernel": 4}, "per_class": {"a": {
        "image_threshold": 0.0325, "pixel_threshold": 0.03, "map_min": 0.01, "map_max": 0.5,
        "image_min": 0.02, "image_max": 0.0487}}}
    return inf, thresholds, FakeDataset(tmp_path / "img", inf, size)


def tile(panel, size, k):
    """Tile ``k`` of a panel (0 image, 1 truth, 2 overlay, 3 thresholded map): the tiles are
    the bottom ``size`` rows, whatever the heading's height."""
    x0 = k * (size + V.GAP)
    return panel[-size:, x0:x0 + size]


# ----------------------------------------------------------------------------- colour scale
def test_threshold_sits_at_the_middle_of_one_fixed_scale(tmp_path):
    """A part just over the threshold was drawn all blue (scale set by the worst defect)."""
    inf, thresholds, dataset = issue_case(tmp_path)
    a = V.panel_for(inf, 0, dataset, thresholds)
    b = V.panel_for(inf, 1, dataset, thresholds)
    image = V.display_image(dataset, 0).astype(int)
    heat = tile(a, 32, 2).astype(int)
    # blended 50/50 with the image: recover the colour the map got
    defect = 2 * heat[14, 14] - image[14, 14]
    assert defect[0] > 150 and defect[2] < 100, f"defect over the threshold not red: {defect}"
    # equal values, equal colours in every image of the class (background 0.02 in both)
    colour_a = 2 * heat[2, 2] - image[2, 2]
    colour_b = 2 * tile(b, 32, 2).astype(int)[2, 2] - V.display_image(dataset, 1)[2, 2]
    assert np.abs(colour_a - colour_b).max() <= 2
    # the map value at the threshold gets the middle colour of the bar
    lo, hi, t = V.color_scale(thresholds, "a")
    assert t == 0.0325 and lo == 0.01 and (t - lo) / (hi - lo) == pytest.approx(0.5)
    mid = V.colorize(V.normalize_map(np.array([[t]]), lo, hi))[0, 0]
    assert np.abs(mid - jet(0.5)).max() <= 4  # 127 or 128 of 255: float rounding
    # the bar of both panels is the same picture (one scale), its black line at mid height
    bar_a, bar_b = a[-32:, -V.colorbar_width():], b[-32:, -V.colorbar_width():]
    assert np.array_equal(bar_a, bar_b)
    dark = np.flatnonzero((bar_a[:, :V.COLORBAR_W - 1] < 40).all(axis=(1, 2)))
    assert dark.size and abs(dark.mean() - 31 / 2) <= 1.5


def test_scale_without_a_map_unit_threshold_uses_the_pixel_one():
    entry = {"map_min": 0.0, "map_max": 9.0}
    assert V.calibrated_range(entry, 2.0, 1.0, "max") == (0.0, 4.0, 2.0)
    assert V.calibrated_range(entry, 2.0, 1.0, "mean") == (0.0, 2.0, 1.0)  # a mean: not map units
    assert V.calibrated_range(entry, None, None, "max") == (0.0, 9.0, None)
    assert V.calibrated_range({}, None, None) == (None, None, None)  # per image
    lo, hi, t = V.calibrated_range({"map_min": 3.0, "map_max": 5.0}, 3.0)  # threshold at min
    assert lo < t < hi and (t - lo) == pytest.approx(hi - t)


def test_colour_bar_has_ticks_a_title_and_the_threshold_marked():
    h, lo, hi, t = 256, 0.01, 0.055, 0.0325
    bar = V.colorbar(h, lo, hi, t)
    w = V.COLORBAR_W
    for frac in (1.0, 0.75, 0.25, 0.0):  # ticks right of the gradient (0.5 is the mark)
        y = int(round((1 - frac) * (h - 1)))
        assert (np.abs(bar[y, w:w + 2].astype(int) - 90) <= 1).all(), f"no tick at {frac}"
    mid = int(round(0.5 * (h - 1)))
    assert (bar[mid, :w - 1] < 40).all()  # the threshold: a black line across the gradient
    ink = (bar[:, -10:] < 128).any(axis=(1, 2))  # the rotated title along the right edge
    assert ink.sum() > 80, f"no title written along the colour bar ({ink.sum()} rows)"


@pytest.mark.parametrize("size", [(256, 256), (64, 64)])
def test_verdict_heading_wraps_instead_of_being_cut_off(size):
    """'...threshold 0.01767: norm' on a 256 px image: the heading was shrunk and clipped."""
    h, w = size
    image = np.full((h, w, 3), 128, np.uint8)
    amap = np.zeros((h, w), np.float32)
    out = V.annotated_overlay(image, amap, 0.0, 0.04, threshold=0.01767, score=0.0151,
                              pixel_threshold=0.015, name="metal_nut")
    head = out[:out.shape[0] - h]
    text = "metal_nut: normal, score 0.0151 < threshold 0.01767"  # the decision first
    ink = int((head.min(axis=2) < 160).sum())
    wide = np.full((V.HEADER, 2000, 3), 255, np.uint8)
    cv2.putText(wide, text, (3, V.HEADER - 5), FONT, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    full = int((wide.min(axis=2) < 160).sum())
    assert ink >= 0.8 * full, f"heading shrunk or clipped: {ink} of {full} ink pixels"
    assert not (head[:, -3:].min(axis=2) < 160).any()  # nothing runs off the right edge


# ----------------------------------------------------------------------------- no masks
def test_a_class_without_masks_says_no_mask(tmp_path):
    inf, thresholds, dataset = issue_case(tmp_path)
    inf["masks"][:] = 0
    thresholds["per_class"]["a"]["pixel_threshold"] = None  # no masks: no pixel threshold
    panel = V.panel_for(inf, 0, dataset, thresholds)
    for k in (1, 2 + 1):  # the truth and the thresholded map
        shown = tile(panel, 32, k)
        assert not (shown == 0).all() and not (shown == 255).all()  # no blank truth / mask
        assert (np.abs(shown.astype(int) - 225) <= 1).mean() > 0.6  # the grey note tile
    # listed in the protocol only (a stored pixel threshold): still no thresholded map
    thresholds["per_class"]["a"]["pixel_threshold"] = 0.03
    listed = V.panel_for(inf, 0, dataset, thresholds, no_masks=["a"])
    assert np.array_equal(listed, panel)


# ----------------------------------------------------------------------------- report.html
def embedded_panels():
    from dualmem.utils import report

    return getattr(report, "REPORT_PANELS", 12)


def report_case(tmp_path, n=None):
    inf, thresholds, dataset = issue_case(tmp_path, n=n or embedded_panels() + 6)
    results = {"protocol": {"dataset": "hand-made", "classes": ["a"], "no_masks": [],
                            "departures": {"backbone": "ResNet-18 " + "x" * 600,
                                           "schedule": "one epoch " + "y" * 600}},
               "per_class": {"a": {"image_auroc": 1.0}}, "mean": {"image_auroc": 1.0}}
    out = tmp_path / "eval"
    write_evaluation_pictures(inf, thresholds, dataset, out, results)
    return out, inf


def test_report_is_self_contained_and_folds_the_departures(tmp_path):
    REPORT_PANELS = embedded_panels()
    out, inf = report_case(tmp_path)
    page = (out / REPORT_NAME).read_text(encoding="utf-8")
    parser = ImgSources()
    parser.feed(page)
    assert parser.src and all(s.startswith("data:image/") for s in parser.src)
    kinds = [s.split(";")[0] for s in parser.src]
    assert kinds.count("data:image/png") == 4 and kinds.count("data:image/jpeg") == REPORT_PANELS
    for src, file in zip(parser.src, parser.files):
        assert decode_data_uri(src) is not None and (out / file).is_file()
    # every panel is written beside the page; those not embedded are counted, not lost
    assert len(list((out / "vis").rglob("*.png"))) == len(inf["filename"])
    assert f"{len(inf['filename']) - REPORT_PANELS} more panels of this class are in vis/a/" \
        in page
    # the departures: once, folded, never in the table
    assert page.count("x" * 600) == 1 and "<details class='departures'>" in page
    details = page.index("<details class='departures'>")
    assert details < page.index("x" * 600) < page.index("</details>", details)
    assert "x" * 600 not in page[page.index("<table>"):page.index("</table>")]
    # size: JPEG panels keep it small (a few KB each here)
    assert (out / REPORT_NAME).stat().st_size < 400_000


def test_mailed_report_renders_in_chromium(tmp_path):
    out, _ = report_case(tmp_path)
    exe = chromium()
    alone = tmp_path / "mail" / REPORT_NAME
    alone.parent.mkdir()
    shutil.copy(out / REPORT_NAME, alone)
    dom = browse(exe, alone, tmp_path, "--dump-dom")
    parser = ImgSources()
    parser.feed(dom)
    assert len(parser.src) == 4 + embedded_panels()
    shot = tmp_path / "report_alone.png"
    browse(exe, alone, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600",
           "--hide-scrollbars")
    img = cv2.imread(str(shot))
    # the first curve (embedded PNG) is drawn: non-white pixels well below the heading
    assert img is not None and (img[400:900] < 200).any(axis=2).mean() > 0.02


# ----------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_of_another_kind_is_named_in_one_line(tmp_path):
    from dualmem.utils.detector import load_model
    from dualmem.utils.errors import UserError

    bare = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(2), "fc.bias": torch.zeros(2)}, bare)
    with pytest.raises(UserError, match=r"is not a DualMem checkpoint: it is a bare state dict "
                                        r"of 2 tensors \(conv1.weight"):
        load_model(bare, "cpu")  # was: "has no 'model' entry"
    from dualmem.utils.checkpoint_kind import CheckpointKindError, check_checkpoint_method

    dmad = tmp_path / "last.pth"
    torch.save({"model": {}, "config": {"net": tiny_dmad_net()}}, dmad)
    want = (f"{dmad} is a DMAD checkpoint (models.heads.DMAD); this run's config builds UniAD "
            f"(models.reconstructions.UniAD)")
    with pytest.raises(CheckpointKindError) as err:
        load_model(dmad, "cpu", expect_net=tiny_net())
    assert str(err.value).startswith(want) and "\n" not in str(err.value)
    with pytest.raises(CheckpointKindError, match="this run's config builds UniAD"):
        check_checkpoint_method(dmad, {"net": tiny_net()})
    check_checkpoint_method(dmad, {"net": tiny_dmad_net()})  # the same method: no objection
    with pytest.raises(CheckpointKindError, match="is not a DualMem checkpoint"):
        check_checkpoint_method(bare, {"net": tiny_net()})


# ----------------------------------------------------------------------------- collect_results
def test_departures_are_never_a_column(tmp_path, capsys):
    from dualmem.tools import collect_results as C

    for name, text in (("r1", "a" * 1200), ("r2", "b" * 1200)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({
            "protocol": {"dataset": "d", "classes": ["c"], "epochs": 1 if name == "r1" else 2,
                         "departures": {"backbone": text}},
            "per_class": {"c": {"image_auroc": 0.9}}, "mean": {"image_auroc": 0.9}}))
    assert C.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    header = next(ln for ln in text.splitlines() if ln.startswith("| run"))
    assert "departures" not in header and "epochs" in header  # only differing keys
    assert "a" * 1200 not in text and "2 different set(s) (--show_departures" in text
    assert C.main([str(tmp_path), "--show_departures"]) == 0
    shown = capsys.readouterr().out
    table_end = max(i for i, ln in enumerate(shown.splitlines()) if ln.startswith("|"))
    below = "\n".join(shown.splitlines()[table_end:])
    assert "runs r1:" in below and "- backbone: " + "a" * 1200 in below and "b" * 1200 in below
    assert C.main([str(tmp_path), "--format", "csv"]) == 0
    assert "departures" not in capsys.readouterr().out.splitlines()[0]
    assert C.main([str(tmp_path), "--format", "json"]) == 0
    sets = json.loads(capsys.readouterr().out)["departures"]
    assert [s["runs"] for s in sets] == [["r1"], ["r2"]]


# ----------------------------------------------------------------------------- predict.py
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-class tiny run (1 epoch, evaluated): (run folder, data root)."""
    from dualmem.tools import train_val

    tmp = tmp_path_factory.mktemp("gallery")
    cfg = {"_base_": str(ROOT / "configs" / "runtime.yaml"), "random_seed": 3,
           "dataset": synthetic_dataset(tmp / "data", seed=2, classes=("disc",)),
           "trainer": {"max_epoch": 1, "val_freq_epoch": 1,
                       "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
           "net": tiny_net()}
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert train_val.main(["--config", str(tmp / "config.yaml"), "--work_dir", str(tmp / "run"),
                           "--no_progress", "--device", "cpu"]) == 0
    return tmp / "run", tmp / "data"


def predict(*args):
    from dualmem.tools import predict as P

    return P.main([*map(str, args), "--device", "cpu"])


def colour_folder(data, dest, n=4):
    dest.mkdir(parents=True)
    for p in sorted(data.glob("disc/test/*/*.png"))[:n]:
        shutil.copy(p, dest / f"{p.parent.name}_{p.name}")
    return dest


@pytest.mark.slow
def test_predict_takes_a_run_folder_and_writes_a_gallery(run_dir, tmp_path, capsys):
    run, data = run_dir
    folder = colour_folder(data, tmp_path / "in")
    out = tmp_path / "out"
    assert predict("--checkpoint", run, "--input", folder, "--output", out) == 0
    captured = capsys.readouterr()
    assert "predicting" in captured.err and "100%" in captured.err  # the progress bar
    page = (out / "index.html").read_text(encoding="utf-8")
    rows = list(__import__("csv").DictReader(open(out / "predictions.csv", encoding="utf-8")))
    assert page.count("<div class='card ") == len(rows) == 4
    assert page.count("src='data:image/jpeg;base64,") == 4 and "http" not in page
    # the overlays: the threshold's black line at the middle of the colour bar
    overlay = cv2.imread(str(out / rows[0]["overlay"]))[..., ::-1]
    h = cv2.imread(str(folder / rows[0]["file"])).shape[0]
    bar = overlay[-h:, overlay.shape[1] - V.colorbar_width():][:, :V.COLORBAR_W - 1]
    dark = np.flatnonzero((bar < 40).all(axis=(1, 2)))
    assert dark.size and abs(dark.mean() - (h - 1) / 2) <= 1.5
    # the gallery alone (as mailed) in Chromium: cards sorted most anomalous first by the script
    exe = chromium()
    alone = tmp_path / "mail" / "index.html"
    alone.parent.mkdir()
    shutil.copy(out / "index.html", alone)
    dom = browse(exe, alone, tmp_path, "--dump-dom")
    ranks = [float(x[1:].split(x[0])[0]) for x in dom.split("data-rank=")[1:]]
    assert len(ranks) == 4 and ranks == sorted(ranks, reverse=True)
    parser = ImgSources()
    parser.feed(dom)
    assert all(decode_data_uri(s) is not None for s in parser.src) and len(parser.src) == 4
    shot = tmp_path / "gallery.png"
    browse(exe, alone, tmp_path, f"--screenshot={shot}", "--window-size=1200,900",
           "--hide-scrollbars")
    assert cv2.imread(str(shot)).std() > 5
    assert predict("--checkpoint", run, "--input", folder, "--output", tmp_path / "quiet",
                   "--no_progress") == 0
    assert "predicting" not in capsys.readouterr().err


@pytest.mark.slow
def test_predict_writes_nothing_for_a_wrong_input(run_dir, tmp_path, capsys):
    run, _ = run_dir
    out = tmp_path / "out"
    assert predict("--checkpoint", run, "--input", tmp_path / "missing", "--output", out) == 2
    assert "--input not found" in capsys.readouterr().err and not out.exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    assert predict("--checkpoint", run, "--input", tmp_path / "empty", "--output", out) == 2
    assert "no image files" in capsys.readouterr().err and not out.exists()
    bare = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bare)
    assert predict("--checkpoint", bare, "--input", tmp_path / "empty", "--output", out) == 2
    err = capsys.readouterr().err
    assert "is not a DualMem checkpoint: it is a bare state dict" in err and not out.exists()


@pytest.mark.slow
def test_predict_follows_trainings_greyscale_rule(run_dir, tmp_path, capsys):
    run, data = run_dir
    folder = colour_folder(data, tmp_path / "mixed", n=3)
    grey = cv2.cvtColor(cv2.imread(str(next(folder.iterdir()))), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(folder / "grey_photo.png"), grey)
    out = tmp_path / "out"
    assert predict("--checkpoint", run, "--input", folder, "--output", out,
                   "--no_progress") == 1  # a grey file among colour ones: refused by name
    rows = {r["file"]: r for r in __import__("csv").DictReader(
        open(out / "predictions.csv", encoding="utf-8"))}
    assert "greyscale image" in rows["grey_photo.png"]["error"]
    assert rows["grey_photo.png"]["score"] == "" and capsys.readouterr().err.count("grey") >= 1
    alone = tmp_path / "grey"
    alone.mkdir()
    cv2.imwrite(str(alone / "a.png"), grey)
    cv2.imwrite(str(alone / "b.png"), grey)
    assert predict("--checkpoint", run, "--input", alone, "--output", tmp_path / "o2",
                   "--no_progress") == 0  # a whole grey class: expanded, with one note
    err = capsys.readouterr().err
    assert err.count("note: 2 greyscale image(s) (a.png, b.png) expanded") == 1
