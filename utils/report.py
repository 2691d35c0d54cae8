"""The pictures of an evaluated run folder and the ``report.html`` that gathers them.

One entry point, ``write_evaluation_pictures``, writes into the folder:

* ``plots/<class>/{roc,pr,pro,hist}.png``: image and pixel ROC and precision-recall, the PRO
  curve up to FPR 0.3 and the image-score histogram with the threshold (``utils.plots``);
* ``vis/<class>/<defect>/<image>.png``: heat-map panels (``utils.visualize.render_panel``
  with its colour bar and a heading stating score, threshold, verdict and label), the same
  paths as ``--evaluate --vis``;
* ``report.html``: the protocol line, the departures from the paper (folded), the result
  table of ``results``, each class's curves and its panels, misclassified ones first (verdict
  ``score >= image threshold`` differs from the label), then by decreasing score. The page is
  self-contained (every picture embedded: curves as PNG, panels as JPEG), so it can be mailed;
  to keep it small it embeds at most ``REPORT_PANELS`` panels per class (misclassified first,
  the rest round-robin over the defect folders) and says how many more are in ``vis/``.

With a TensorBoard ``writer`` each class's four curves also go in as one image,
``val/curves/<class>`` at ``step``.
"""
import base64
import html
import os
import re
from pathlib import Path

import numpy as np

REPORT_NAME = "report.html"
REPORT_PANELS = 12     # panels embedded per class (the rest stay in vis/, counted on the page)
JPEG_QUALITY = 80     # 4:4:4, so that the red and green heading text stays sharp

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
details.departures { margin: 0.5em 0; }
details.departures summary { cursor: pointer; }
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
    from dualmem.utils.visualize import select_for_vis

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
    from dualmem.utils.visualize import defect_name

    name = Path(str(inf["filename"][i]))
    rel = Path("vis") / _safe(inf["clsname"][i]) / _safe(defect_name(name)) / (name.stem + ".png")
    k = 1
    while rel.as_posix() in used:  # same stem twice (a.png, a.jpg): keep both
        rel = rel.with_name(f"{name.stem}_{k}.png")
        k += 1
    used.add(rel.as_posix())
    return rel


def data_uri(rgb, fmt="jpeg"):
    """An RGB uint8 picture as a ``data:`` URI (JPEG 4:4:4 for photos and panels, PNG for line
    art), so that a page holding it needs no other file."""
    import cv2

    bgr = np.ascontiguousarray(rgb[..., ::-1]) if rgb.ndim == 3 else rgb
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444] if fmt == "jpeg" else \
        [cv2.IMWRITE_PNG_COMPRESSION, 9]
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", bgr, params)
    if not ok:
        raise OSError(f"cannot encode a {rgb.shape} picture as {fmt}")
    return f"data:image/{fmt};base64,{base64.b64encode(buf.tobytes()).decode('ascii')}"


def _img(uri, rel, alt, lazy=False):
    """An embedded picture; ``data-file`` names the full-size file written beside the page."""
    e = html.escape
    return (f"<img src='{uri}' data-file='{e(Path(rel).as_posix(), quote=True)}' "
            f"alt='{e(alt, quote=True)}' title='{e(Path(rel).as_posix(), quote=True)}'" +
            (" loading='lazy'>" if lazy else ">"))


def _fmt(v, digits=4):
    return "n/a" if v is None else f"{float(v):.{digits}g}"


def render_html(title, results, class_sections, note=None):
    """The report page. ``class_sections``: [(class, entry, [(curve path, data URI)],
    [(panel path, data URI, caption, wrong)], panels not embedded)], paths relative to the
    report (where the full-size files are)."""
    from dualmem.utils.results import departure_lines, departures_heading, protocol_line, results_table

    e = html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>"]
    if results:
        protocol = results.get("protocol") or {}
        out.append(f"<p class='protocol'>{e(protocol_line(protocol, departures=False))}</p>")
        lines = departure_lines(protocol)
        if lines:  # long sentences: shown once, folded
            head = departures_heading(protocol).rstrip(":")
            out.append(f"<details class='departures'><summary>{e(head)} ({len(lines)})"
                       f"</summary><ul>" +
                       "".join(f"<li>{e(line[2:])}</li>" for line in lines) + "</ul></details>")
        if results.get("per_class") is not None and results.get("mean") is not None:
            out.append(results_table(results, fmt="html"))  # tabulate escapes the cells
        best = results.get("best_on_test_set")
        if best:
            out.append(f"<p>{e(str(best.get('note', 'best on the test set')))} "
                       f"(epoch {e(str(best.get('epoch')))})</p>")
    if note:
        out.append(f"<p>{e(note)}</p>")
    out.append("<h2>Curves</h2>")
    for cls, entry, curves, _, _ in class_sections:
        out.append(f"<h3 id='curves-{e(_safe(cls))}'>{e(str(cls))}</h3>")
        pixel = (f"{_fmt(entry.get('pixel_threshold'))} "
                 f"({e(str(entry.get('pixel_threshold_source', 'n/a')))})"
                 if entry.get("pixel_threshold") is not None else "none (no masks)")
        out.append(f"<p>image threshold {_fmt(entry.get('image_threshold'))} "
                   f"({e(str(entry.get('image_threshold_source', 'n/a')))}), pixel threshold "
                   f"{pixel}</p>")
        out.append("<div class='curves'>")
        out += [f"<figure>{_img(uri, p, f'{cls} {Path(p).stem}')}</figure>" for p, uri in curves]
        out.append("</div>")
    if any(panels for _, _, _, panels, _ in class_sections):
        out.append("<h2>Heat maps</h2><p>Per class, misclassified images first (framed), then "
                   "by decreasing score. Colours are on each class's fixed scale: the black "
                   "line of the colour bar is the threshold (green-yellow), red lies above "
                   "it.</p>")
    for cls, _, _, panels, more in class_sections:
        if not panels:
            continue
        n_wrong = sum(1 for *_, w in panels if w)
        out.append(f"<h3 id='panels-{e(_safe(cls))}'>{e(str(cls))}: {len(panels)} images, "
                   f"{n_wrong} misclassified</h3>")
        if more:
            out.append(f"<p>{more} more panels of this class are in "
                       f"vis/{e(_safe(cls))}/ (not embedded, to keep this page small)</p>")
        out.append("<div class='panels'>")
        for path, uri, caption, wrong in panels:
            out.append(f"<figure class='panel{' wrong' if wrong else ''}'>"
                       f"{_img(uri, path, caption, lazy=True)}"
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
    max_images per class). Classes listed in the protocol's ``no_masks`` get panels saying "no
    mask". Returns the written paths (report.html last).
    """
    from dualmem.utils import plots
    from dualmem.utils.visualize import VIS_DEFAULTS, panel_for, verdict_text, write_png, defect_name

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
            paths.append((rel, data_uri(rgb, "png")))
        curve_paths[cls] = paths
        if writer is not None:
            h = max(im.shape[0] for im in images)
            strip = np.concatenate([np.pad(im, ((0, h - im.shape[0]), (0, 0), (0, 0)),
                                           constant_values=255) for im in images], axis=1)
            writer.add_image(f"val/curves/{cls}", strip, step, dataformats="HWC")

    panels, more = {cls: [] for cls in classes}, {}
    no_masks = ((results or {}).get("protocol") or {}).get("no_masks") or ()
    if dataset is not None and len(inf["clsname"]):
        max_images = settings.get("max_images")
        order = panel_order(inf, thresholds, None if max_images is None else int(max_images))
        cap = REPORT_PANELS if max_images is None else min(int(max_images), REPORT_PANELS)
        embed = {i for idx in panel_order(inf, thresholds, cap).values() for i in idx}
        _, wrong = verdicts(inf, thresholds)
        used = set()
        for cls, idx in order.items():
            for i in idx:
                rel = _panel_path(inf, i, used)
                rgb = panel_for(inf, i, dataset, thresholds, settings.get("normalize", "global"),
                                float(settings.get("alpha", 0.5)), no_masks)
                written.append(write_png(out_dir / rel, rgb))
                if i not in embed:
                    more[cls] = more.get(cls, 0) + 1
                    continue
                text, _ = verdict_text(inf["score"][i],
                                       _entry(thresholds, cls).get("image_threshold"),
                                       inf["label"][i])
                caption = f"{inf['filename'][i]} ({defect_name(inf['filename'][i])}): {text}"
                panels.setdefault(cls, []).append((rel, data_uri(rgb), caption, wrong[i]))

    sections = [(cls, _entry(thresholds, cls), curve_paths.get(cls, []), panels.get(cls, []),
                 more.get(cls, 0)) for cls in classes]
    page = render_html(f"Evaluation: {out_dir.name}", results, sections)
    path = out_dir / REPORT_NAME
    tmp = out_dir / (REPORT_NAME + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    written.append(path)
    return written


# ----------------------------------------------------------------------------- predict gallery
GALLERY_NAME = "index.html"
_GALLERY_CSS = """
body { font-family: sans-serif; margin: 1.2em; color: #222; }
div.bar { margin: 0.6em 0; } div.bar label { margin-right: 1em; }
div.cards { display: flex; flex-wrap: wrap; gap: 0.8em; }
div.card { width: 330px; border: 2px solid #ddd; padding: 4px; font-size: 0.85em; }
div.card img { width: 100%; display: block; }
div.card.anomalous { border-color: #c80000; } div.card.normal { border-color: #2e8b2e; }
div.card.failed { border-color: #777; background: #f3f3f3; }
.verdict { font-weight: bold; } .anomalous .verdict { color: #c80000; }
.normal .verdict { color: #1f7a1f; } .failed .verdict { color: #555; }
.file { word-break: break-all; } .error { color: #a00; }
"""
_GALLERY_JS = """
function show() {
  var key = document.getElementById('sort').value, only = document.getElementById('only').value;
  var box = document.getElementById('cards');
  var cards = Array.prototype.slice.call(box.children);
  cards.sort(function (a, b) {
    if (key === 'file') return a.dataset.file < b.dataset.file ? -1 : 1;
    var x = parseFloat(a.dataset.rank), y = parseFloat(b.dataset.rank);
    if (isNaN(x)) return 1; if (isNaN(y)) return -1;
    return key === 'score_up' ? x - y : y - x;
  });
  cards.forEach(function (c) {
    c.style.display = (only === 'all' || c.classList.contains(only)) ? '' : 'none';
    box.appendChild(c);
  });
}
"""


def gallery_rank_key(rows):
    """What "most anomalous first" sorts by: the normalised score (each class's threshold at
    0.5, so classes compare) when every scored row has one, else the raw score."""
    scored = [r for r in rows if r.get("score") not in (None, "")]
    return "normalized_score" if scored and all(
        r.get("normalized_score") not in (None, "") for r in scored) else "score"


def gallery_html(title, rows, thumbs, summary=""):
    """The prediction gallery: one card per ``predictions.csv`` row (thumbnail of its overlay
    embedded as a data URI and linked to the full-size file, score, verdict in colour, class,
    error), sortable by score (``gallery_rank_key``) or name and filterable by verdict with a
    small inline script; no network, no other file needed to view it. ``thumbs``: {file: data
    URI}."""
    e = html.escape
    key = gallery_rank_key(rows)
    by = "normalised score" if key == "normalized_score" else "score"
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{e(title)}</title><style>{_GALLERY_CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>", f"<p>{e(summary)}</p>" if summary else "",
           "<div class='bar'><label>sort <select id='sort' onchange='show()'>"
           f"<option value='score_down'>most anomalous first ({by})</option>"
           f"<option value='score_up'>least anomalous first ({by})</option>"
           "<option value='file'>file name</option></select></label>"
           "<label>show <select id='only' onchange='show()'><option value='all'>all</option>"
           "<option value='anomalous'>anomalous</option><option value='normal'>normal</option>"
           "<option value='failed'>failed</option><option value='undecided'>no verdict"
           "</option></select></label></div><div class='cards' id='cards'>"]
    for row in rows:
        kind = "failed" if row.get("error") else {1: "anomalous", 0: "normal"}.get(
            row.get("is_anomalous"), "undecided")
        verdict = {"failed": "FAILED", "anomalous": "ANOMALOUS", "normal": "normal"}.get(
            kind, "no verdict")
        score = row.get("score")
        lines = [f"<span class='verdict'>{verdict}</span>"]
        if score not in (None, ""):
            lines[0] += f" score {float(score):.4g}"
            if row.get("image_threshold") is not None:
                lines[0] += f" (threshold {float(row['image_threshold']):.4g})"
            if row.get("normalized_score") not in (None, ""):
                lines[0] += f", normalised {float(row['normalized_score']):.3f}"
        lines.append(f"class {e(str(row.get('class') or 'unknown: global thresholds'))}")
        lines.append(f"<span class='file'>{e(str(row['file']))}</span>")
        if row.get("error"):
            lines.append(f"<span class='error'>{e(str(row['error']))}</span>")
        thumb = thumbs.get(row["file"])
        img = "" if not thumb else (
            f"<a href='{e(str(row.get('overlay') or ''), quote=True)}'>"
            f"<img src='{thumb}' alt='{e(str(row['file']), quote=True)}' loading='lazy'></a>")
        out.append(f"<div class='card {kind}' data-rank='{e(str(row.get(key) or ''), quote=True)}' "
                   f"data-file='{e(str(row['file']), quote=True)}'>{img}"
                   f"<div>{'<br>'.join(lines)}</div></div>")
    out += ["</div>", f"<script>{_GALLERY_JS}show();</script>", "</body></html>"]
    return "\n".join(out) + "\n"
