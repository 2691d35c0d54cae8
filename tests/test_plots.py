"""Curves and histograms of an evaluation (utils/plots.py), the public curve function of
utils/metrics.py they are drawn from, and the annotated heat maps of utils/visualize.py.

The plotted data are read back from the matplotlib figures and checked against independent
references: scikit-learn's roc_curve / average_precision_score, utils.metrics.pixel_aupro, numpy
histograms, hand-computed colour bars."""
import inspect

import cv2
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from dualmem.utils import metrics as M
from dualmem.utils import plots as P
from dualmem.utils import visualize as V
from dualmem.utils.evaluator import compute_thresholds
from dualmem.utils.metrics import image_score_from_map


def make_inference(seed=0, counts=(8, 5), size=24, anomalies=(True, False), dtype=np.float16):
    """Hand-built inference dict: class 'a' with anomalous images holding one to three GT
    regions (hot where the map says so, with noise), class 'b' with normal images only."""
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("filename", "clsname", "label", "maps", "masks")}
    for cls, count, has_anom in zip(("a", "b"), counts, anomalies):
        for i in range(count):
            anomalous = has_anom and i % 2 == 1
            mask = np.zeros((size, size), np.uint8)
            amap = rng.random((size, size)).astype(np.float32)
            if anomalous:
                for _ in range(1 + i % 3):  # 1-3 regions, some may touch
                    y, x = rng.integers(1, size - 6, 2)
                    hgt, wid = rng.integers(2, 6, 2)
                    mask[y:y + hgt, x:x + wid] = 1
                    amap[y:y + hgt, x:x + wid] += rng.random() * 1.2
            defect = "crack" if anomalous else "good"
            out["filename"].append(f"{cls}/test/{defect}/{i:03d}.png")
            out["clsname"].append(cls)
            out["label"].append(int(anomalous))
            out["maps"].append(amap.astype(dtype))
            out["masks"].append(mask)
    out["maps"] = np.stack(out["maps"])
    out["masks"] = np.stack(out["masks"])
    out["label"] = np.asarray(out["label"])
    out["score"] = image_score_from_map(out["maps"].astype(np.float32), "max", 4)
    out["index"] = np.arange(len(out["label"]))
    return out


def line(fig, gid):
    for ax in fig.axes:
        for ln in ax.get_lines():
            if ln.get_gid() == gid:
                return ln.get_xydata()
    raise AssertionError(f"no line {gid!r} in the figure")


def on_polyline(x, y, px, py, eps=1e-9):
    """Whether each point (px, py) lies on the monotone polyline (x, y)."""
    i_l = np.searchsorted(x, px, side="left")
    i_r = np.searchsorted(x, px, side="right")
    ok = np.zeros(len(px), bool)
    at = i_r > i_l  # vertices at exactly px: a vertical run from y[i_l] to y[i_r - 1]
    ok[at] = (y[i_l[at]] - eps <= py[at]) & (py[at] <= y[i_r[at] - 1] + eps)
    j = np.flatnonzero(~at & (i_l > 0) & (i_l < len(x)))  # inside segment (i_l - 1, i_l)
    a, b = i_l[j] - 1, i_l[j]
    yi = y[a] + (y[b] - y[a]) * (px[j] - x[a]) / (x[b] - x[a])
    ok[j] = np.abs(yi - py[j]) <= eps
    return ok


def trapezoid(x, y):
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) * 0.5)


# ----------------------------------------------------------------------------- metrics API
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_plotted_pro_curve_area_is_pixel_aupro(dtype):
    inf = make_inference(seed=1, counts=(12, 4), dtype=dtype)
    sel = np.asarray(inf["clsname"]) == "a"
    fig = P.class_figures(inf, "a")["pro"]
    xy = line(fig, "pixel_pro")
    x, y = xy[:, 0], xy[:, 1]
    assert x[0] == 0.0 and x[-1] == pytest.approx(0.3, abs=1e-15) and np.all(np.diff(x) >= 0)
    ref = M.pixel_aupro(inf["maps"][sel], inf["masks"][sel], 0.3)
    assert ref is not None and 0.0 < ref < 1.0
    assert abs(trapezoid(x, y) / 0.3 - ref) <= 1e-6
    assert fig.axes[0].get_xlim() == pytest.approx((0.0, 0.3))
    # the same function cut elsewhere keeps agreeing with the metric
    c = M.ranking_curves(inf["maps"][sel], inf["masks"][sel], regions=True, fpr_limit=0.05)
    assert abs(trapezoid(*c["pro"]) / 0.05 - M.pixel_aupro(inf["maps"][sel], inf["masks"][sel],
                                                          0.05)) <= 1e-6


def test_plotted_roc_points_are_sklearn_roc_points():
    inf = make_inference(seed=2, counts=(30, 4))
    sel = np.asarray(inf["clsname"]) == "a"
    figs = P.class_figures(inf, "a")
    for gid, scores, labels in (("image_roc", inf["score"][sel], inf["label"][sel]),
                                ("pixel_roc", inf["maps"][sel].astype(np.float64).ravel(),
                                 inf["masks"][sel].ravel())):
        xy = line(figs["roc"], gid)
        ours = {(round(a, 12), round(b, 12)) for a, b in xy}
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        every = {(round(a, 12), round(b, 12)) for a, b in zip(fpr, tpr)}
        # each plotted point is one of sklearn's, and each of sklearn's lies on the plotted
        # polyline (only points inside horizontal runs are left out: the same polyline)
        assert ours <= every | {(1.0, 1.0)}
        assert on_polyline(xy[:, 0], xy[:, 1], fpr, tpr).all()
        assert trapezoid(xy[:, 0], xy[:, 1]) == pytest.approx(roc_auc_score(labels, scores),
                                                             abs=1e-12)


def test_plotted_pr_steps_integrate_to_sklearn_average_precision():
    inf = make_inference(seed=3, counts=(20, 3))
    sel = np.asarray(inf["clsname"]) == "a"
    fig = P.class_figures(inf, "a")["pr"]
    for gid, scores, labels in (("image_pr", inf["score"][sel], inf["label"][sel]),
                                ("pixel_pr", inf["maps"][sel].astype(np.float64).ravel(),
                                 inf["masks"][sel].ravel())):
        xy = line(fig, gid)
        r, p = xy[:, 0], xy[:, 1]
        assert np.all(np.diff(r) >= 0) and r[0] == 0.0 and r[-1] == pytest.approx(1.0)
        # step drawn 'pre': on (r[k-1], r[k]] the precision is p[k], exactly what AP sums
        assert np.sum(np.diff(r) * p[1:]) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12)


def test_visualize_uses_the_public_curve_function():
    src = inspect.getsource(V)
    assert "_build_curve" not in src and "ranking_curves" in src
    rng = np.random.default_rng(4)
    s, y = rng.random(50), rng.random(50) < 0.4
    np.testing.assert_array_equal(V.roc_points(s, y)[0], M.ranking_curves(s, y)["roc"][0])
    assert M.ranking_curves(s, np.zeros(50)) is None


def test_one_roc_drawer_serves_the_report_and_tensorboard(monkeypatch):
    """TensorBoard's ROC image (visualize.roc_figure) is drawn by the report's drawer
    (plots.draw_roc): every class's curve as plotted is its ranking curve, a class with one kind
    of label is listed as n/a, and the image is the figures side by side."""
    assert not hasattr(V, "draw_roc")
    inf = make_inference(seed=5, counts=(12, 4))
    drawn = []
    real = P.draw_roc

    def spy(lines, title, figsize=P.FIGSIZE):
        fig = real(lines, title, figsize)  # read back now: rendering clears the figure
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        drawn.append((title, line(fig, "a_roc"), legend))
        return fig

    monkeypatch.setattr(P, "draw_roc", spy)
    rgb = V.roc_figure(inf, size=200)
    assert rgb.shape == (200, 400, 3) and [d[0] for d in drawn] == ["image ROC", "pixel ROC"]
    sel = np.asarray(inf["clsname"]) == "a"
    for (_, xy, legend), (scores, labels) in zip(drawn, (
            (inf["score"][sel], inf["label"][sel]), (inf["maps"][sel], inf["masks"][sel]))):
        np.testing.assert_array_equal(xy, np.stack(M.ranking_curves(scores, labels)["roc"], 1))
        assert legend[-1] == "b AUROC n/a" and legend[1].startswith("a AUROC ")


# ----------------------------------------------------------------------------- histogram
def test_histogram_counts_and_threshold_line():
    inf = make_inference(seed=5, counts=(14, 6))
    th = compute_thresholds(inf, {"reduction": "max", "kernel": 4}, ["a", "b"])
    for cls in ("a", "b"):
        entry = th["per_class"][cls]
        sel = np.asarray(inf["clsname"]) == cls
        fig = P.class_figures(inf, cls, entry)["hist"]
        ax = fig.axes[0]
        bars = {c.patches[0].get_gid(): c.patches for c in ax.containers}
        labels, scores = inf["label"][sel], inf["score"][sel]
        for gid, want in (("hist_normal", labels == 0), ("hist_anomalous", labels == 1)):
            patches = bars[gid]
            edges = [p.get_x() for p in patches]  # + the right end (matplotlib's sum rounds)
            edges.append(patches[-1].get_x() + patches[-1].get_width() + 1e-12)
            counts, _ = np.histogram(scores[want], bins=np.asarray(edges))
            assert [p.get_height() for p in patches] == counts.tolist()
            assert counts.sum() == want.sum()  # every score inside the drawn range
        xy = line(fig, "threshold")
        assert np.all(xy[:, 0] == entry["image_threshold"])
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(entry["image_threshold_source"] in t for t in legend)


def test_figures_of_a_class_without_anomalies_render():
    inf = make_inference(seed=6)
    figs = P.class_figures(inf, "b")
    assert list(figs) == list(P.KINDS)
    for fig in figs.values():
        rgb = P.figure_to_rgb(fig)
        assert rgb.dtype == np.uint8 and rgb.shape == (330, 400, 3)
        assert (rgb < 128).any()  # axes and text drawn
    texts = [t.get_text() for t in P.class_figures(inf, "b")["pro"].axes[0].texts]
    assert any("undefined" in t for t in texts)


# ----------------------------------------------------------------------------- heat maps
def test_panel_colorbar_and_heading():
    rng = np.random.default_rng(7)
    h, w = 48, 40
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    amap = rng.random((h, w)).astype(np.float32)
    lo, hi, t = 0.0, 2.0, 1.5
    panel = V.render_panel(image, None, amap, lo, hi, t, heading=("x: ANOMALOUS", (200, 0, 0)))
    assert panel.shape == V.panel_shape(h, w, heading=True, colorbar=True)
    top = 2 * V.HEADER
    assert np.array_equal(panel[top:, :w], image)  # tiles below the two strips
    bar = panel[top:, 4 * w + 4 * V.GAP:4 * w + 4 * V.GAP + V.COLORBAR_W - 1]
    # gradient: JET(hi) at the top row, JET(lo) at the bottom, the threshold a black line
    ramp = V.colorize(np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None])[:, 0]
    mark = int(round((1 - (t - lo) / (hi - lo)) * (h - 1)))
    keep = np.abs(np.arange(h) - mark) > 1
    assert np.abs(bar[keep].astype(int) - ramp[keep][:, None]).max() <= 1
    assert np.all(bar[mark] == 0)
    # heading strip: red text on white
    head = panel[:V.HEADER].astype(int)
    assert ((head[..., 0] > 150) & (head[..., 1] < 80)).any()
    # without heading and colour bar: the original four-tile layout
    plain = V.render_panel(image, None, amap, lo, hi, t, colorbar=False)
    assert plain.shape == (V.HEADER + h, 4 * w + 3 * V.GAP, 3)


def test_verdict_text_states_decision_and_mistakes():
    assert V.verdict_text(0.7, 0.5, 1)[0] == "score 0.7 >= t 0.5: ANOMALOUS; label anomalous"
    text, color = V.verdict_text(0.7, 0.5, 0)
    assert text.endswith("WRONG") and color != V.verdict_text(0.7, 0.5, 1)[1]
    assert "normal" in V.verdict_text(0.2, 0.5, 0)[0]
    assert "WRONG" in V.verdict_text(0.2, 0.5, 1)[0]
    assert "no threshold" in V.verdict_text(0.2, None, 1)[0]


@pytest.mark.parametrize("size", [(60, 80), (600, 900)])
def test_annotated_overlay_for_predict(size):
    h, w = size
    image = np.full((h, w, 3), 100, np.uint8)
    amap = np.zeros((h // 4, w // 4), np.float32)
    amap[2:5, 2:5] = 1.0
    out = V.annotated_overlay(image, amap, 0.0, 1.0, threshold=0.4, score=0.9, verdict=None,
                              pixel_threshold=0.5)
    scale = max(1.0, min(h, w) / 256.0)
    line = int(round(V.HEADER * scale))
    strip = out.shape[0] - h  # the heading: one line, or more when it wraps on a small image
    assert strip >= line and strip % line == 0 and out.shape[1] > w
    assert out.dtype == np.uint8
    # the overlay itself: image blended with JET of the resized map, at the image's size
    heat = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    ref = V.overlay(image, V.normalize_map(heat, 0.0, 1.0), 0.5)
    assert np.array_equal(out[strip:, :w], ref)
    # red heading text (anomalous: 0.9 >= 0.4), and the colour bar right of the image
    head = out[:strip].astype(int)
    assert ((head[..., 0] > 150) & (head[..., 1] < 80)).any()
    right = out[strip:, w:]
    assert (right[..., 2] > 200).any() and (right[..., 0] > 200).any()  # blue and red ends
    normal = V.annotated_overlay(image, amap, 0.0, 1.0, threshold=0.95, score=0.9, verdict=None)
    head = normal[:strip].astype(int)
    assert ((head[..., 1] > 100) & (head[..., 0] < 60)).any()  # green: normal


def test_a_class_without_masks_gets_no_pixel_curves():
    """Bad images without mask files: no pixel ROC / PR / PRO against invented masks."""
    from dualmem.utils import plots

    rng = np.random.default_rng(0)
    n = 6
    inf = {"clsname": ["c"] * n, "score": rng.random(n), "label": np.array([0, 0, 0, 1, 1, 1]),
           "maps": rng.random((n, 8, 8)).astype(np.float32),
           "masks": np.ones((n, 8, 8), np.uint8) * np.array([0, 0, 0, 1, 1, 1])[:, None, None],
           "has_mask": np.zeros(n, bool)}
    curves = plots.class_curves(inf, "c")
    assert curves["pixel"] is None and curves["no_masks"] and curves["image"] is not None
    inf["has_mask"] = np.array([False, False, False, True, True, True])
    assert plots.class_curves(inf, "c")["pixel"] is not None
