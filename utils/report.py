"""The pictures of an evaluated run folder and the ``report.html`` that gathers them.

One entry point, ``write_evaluation_pictures``, writes into the folder:

* ``plots/<class>/{roc,pr,pro,hist}.png``: image and pixel ROC and precision-recall, the PRO
  curve up to FPR 0.3 and the image-score histogram with the threshold (``utils.plots``);
* ``vis/<class>/<defect>/<image>.png``: heat-map panels (``utils.visualize.render_panel``
  with its colour bar and a heading stating score, threshold, verdict and label), the same
  paths as ``--evaluate --vis``;
* ``report.html``: the protocol line and result table of ``results``, each class's curves and
  its panels, misclassified ones first (verdict ``score >= image threshold`` differs from the
  label), then by decreasing score.

With a TensorBoard ``writer`` each class's four curves also go in as one image,
``val/curves/<class>`` at ``step``.
"""
import html
import os
import re
from pathlib import Path
from urllib.parse import quote

import numpy as np

REPORT_NAME = "report.html"

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
p.protocol { font-family: monospace; font-size: 0.85em; background: #f4f4f4; padding: 0.5em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr:last-child td { font-weight: bold; }
div.curves, div.panels { display: flex; flex-wrap: wrap; gap: 0.6em; }
figure { margin: 0; }
figure.panel { border: 2px solid #ddd; padding: 2px; }
figure.wrong { border-color: #c800a0; }
figcaption { font-size: 0.8em; max-width: 1000px; }
"""


def _safe(name):
    """A class or folder name usable as one path component."""
    name = re.sub(r"[^\w.=+-]+", "_", str(name)).strip("._")
    return name or "unnamed"


def _entry(thresholds, cls):
    return ((thresholds or {}).get("per_class") or {}).get(cls) or {}


def verdicts(inf, thresholds):
    """Per image: (predicted anomalous or None without a threshold, misclassified)."""
    pred, wrong = [], []
    for cls, score, label in zip(inf["clsname"], inf["score"], inf["label"]):
        t = _entry(thresholds, cls).get("image_threshold")
        p = None if t is None else bool(float(score) >= float(t))
        pred.append(p)
        wrong.append(p is not None and p != (int(label) > 0))
    return pred, wrong


def panel_order(inf, thresholds, max_images=None):
    """Per class (first-appearance order) the images whose panels the report shows:
    misclassified first, then the rest, each by decreasing score. With ``max_images`` a class
    keeps at most that many: misclassified ones first, the others round-robin over the defect
    folders (``visualize.select_for_vis``)."""
    from utils.visualize import select_for_vis

    _, wrong = verdicts(inf, thresholds)
    scores = np.asarray(inf["score"], np.float64)
    names = np.asarray(inf["clsname"])
    order = {}
    for cls in dict.fromkeys(inf["clsname"]):
        idx = [int(i) for i in np.flatnonzero(names == cls)]
        bad = [i for i in idx if wrong[i]]
        rest = [i for i in idx if not wrong[i]]
        if max_images is not None and len(idx) > int(max_images):
            room = max(0, int(max_images) - len(bad))
            bad = sorted(bad, key=lambda i: -scores[i])[:int(max_images)]
            sub = {k: [inf[k][i] for i in rest] for k in ("clsname", "filename")}
            rest = [rest[j] for j in select_for_vis(sub, room)] if room else []
        order[cls] = (sorted(bad, key=lambda i: (-scores[i], i)) +
                      sorted(rest, key=lambda i: (-scores[i], i)))
    return order


def _panel_path(inf, i, used):
    from utils.visualize import defect_name

    name = Path(str(inf["filename"][i]))
    rel = Path("vis") / _safe(inf["clsname"][i]) / _safe(defect_name(name)) / (name.stem + ".png")
    k = 1
    while rel.as_posix() in used:  # same stem twice (a.png, a.jpg): keep both
        rel = rel.with_name(f"{name.stem}_{k}.png")
        k += 1
    used.add(rel.as_posix())
    return rel


def _src(rel):
    return html.escape(quote(Path(rel).as_posix()), quote=True)


def _fmt(v, digits=4):
    return "n/a" if v is None else f"{float(v):.{digits}g}"


def render_html(title, results, class_sections, note=None):
    """The report page. ``class_sections``: [(class, entry, [curve paths], [(panel path,
    caption, wrong)])], paths relative to the report."""
    from utils.results import departure_lines, departures_heading, protocol_line, results_table

    e = html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>"]
    if results:
        protocol = results.get("protocol") or {}
        out.append(f"<p class='protocol'>{e(protocol_line(protocol, departures=False))}</p>")
        lines = departure_lines(protocol)
        if lines:
            out.append(f"<p>{e(departures_heading(protocol))}</p><ul>" +
                       "".join(f"<li>{e(line[2:])}</li>" for line in lines) + "</ul>")
        if results.get("per_class") is not None and results.get("mean") is not None:
            out.append(results_table(results, fmt="html"))  # tabulate escapes the cells
        best = results.get("best_on_test_set")
        if best:
            out.append(f"<p>{e(str(best.get('note', 'best on the test set')))} "
                       f"(epoch {e(str(best.get('epoch')))})</p>")
    if note:
        out.append(f"<p>{e(note)}</p>")
    out.append("<h2>Curves</h2>")
    for cls, entry, curves, _ in class_sections:
        out.append(f"<h3 id='curves-{e(_safe(cls))}'>{e(str(cls))}</h3>")
        out.append(f"<p>image threshold {_fmt(entry.get('image_threshold'))} "
                   f"({e(str(entry.get('image_threshold_source', 'n/a')))}), pixel threshold "
                   f"{_fmt(entry.get('pixel_threshold'))} "
                   f"({e(str(entry.get('pixel_threshold_source', 'n/a')))})</p>")
        out.append("<div class='curves'>")
        out += [f"<figure><img src='{_src(p)}' alt='{e(str(cls))} {e(Path(p).stem)}'></figure>"
                for p in curves]
        out.append("</div>")
    if any(panels for *_, panels in class_sections):
        out.append("<h2>Heat maps</h2><p>Per class, misclassified images first (framed), then "
                   "by decreasing score.</p>")
    for cls, _, _, panels in class_sections:
        if not panels:
            continue
        n_wrong = sum(1 for *_, w in panels if w)
        out.append(f"<h3 id='panels-{e(_safe(cls))}'>{e(str(cls))}: {len(panels)} images, "
                   f"{n_wrong} misclassified</h3><div class='panels'>")
        for path, caption, wrong in panels:
            out.append(f"<figure class='panel{' wrong' if wrong else ''}'>"
                       f"<img src='{_src(path)}' alt='{e(caption)}' loading='lazy'>"
                       f"<figcaption>{e(caption)}</figcaption></figure>")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_evaluation_pictures(inf, thresholds, dataset, out_dir, results, writer=None,
                              step=None, vis_cfg=None):
    """Curves, histograms, heat-map panels and ``report.html`` of one evaluation.

    ``inf``: ``utils.evaluator.run_inference`` output; ``thresholds``: ``compute_thresholds``
    output; ``dataset``: the test dataset (``visualize.display_image``; None draws no panels);
    ``results``: the results dict (protocol / per_class / mean); ``writer``: a tensorboardX
    ``SummaryWriter`` or None; ``vis_cfg``: ``evaluator.vis`` settings (normalize, alpha,
    max_images per class). Returns the written paths (report.html last).
    """
    from utils import plots
    from utils.visualize import VIS_DEFAULTS, panel_for, verdict_text, write_png, defect_name

    settings = dict(VIS_DEFAULTS)
    settings.update(vis_cfg or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    classes = list(dict.fromkeys(inf["clsname"]))
    if results and results.get("per_class"):  # the table's order first
        classes = [c for c in results["per_class"] if c in classes] + \
                  [c for c in classes if c not in results["per_class"]]

    curve_paths = {}
    for cls in classes:
        figs = plots.class_figures(inf, cls, _entry(thresholds, cls))
        images, paths = [], []
        for kind in plots.KINDS:
            rgb = plots.figure_to_rgb(figs[kind])
            rel = Path("plots") / _safe(cls) / f"{kind}.png"
            written.append(write_png(out_dir / rel, rgb))
            images.append(rgb)
            paths.append(rel)
        curve_paths[cls] = paths
        if writer is not None:
            h = max(im.shape[0] for im in images)
            strip = np.concatenate([np.pad(im, ((0, h - im.shape[0]), (0, 0), (0, 0)),
                                           constant_values=255) for im in images], axis=1)
            writer.add_image(f"val/curves/{cls}", strip, step, dataformats="HWC")

    panels = {cls: [] for cls in classes}
    if dataset is not None and len(inf["clsname"]):
        max_images = settings.get("max_images")
        order = panel_order(inf, thresholds, None if max_images is None else int(max_images))
        _, wrong = verdicts(inf, thresholds)
        used = set()
        for cls, idx in order.items():
            for i in idx:
                rel = _panel_path(inf, i, used)
                rgb = panel_for(inf, i, dataset, thresholds, settings.get("normalize", "global"),
                                float(settings.get("alpha", 0.5)))
                written.append(write_png(out_dir / rel, rgb))
                text, _ = verdict_text(inf["score"][i],
                                       _entry(thresholds, cls).get("image_threshold"),
                                       inf["label"][i])
                caption = f"{inf['filename'][i]} ({defect_name(inf['filename'][i])}): {text}"
                panels.setdefault(cls, []).append((rel, caption, wrong[i]))

    sections = [(cls, _entry(thresholds, cls), curve_paths.get(cls, []), panels.get(cls, []))
                for cls in classes]
    page = render_html(f"Evaluation: {out_dir.name}", results, sections)
    path = out_dir / REPORT_NAME
    tmp = out_dir / (REPORT_NAME + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    written.append(path)
    return written
