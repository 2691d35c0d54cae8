"""tools/collect_results.py: any runs' results.json in one table (markdown, CSV, JSON), with the
protocol differences as columns, and clear errors (exit 2) for bad input."""
import csv
import io
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from dualmem.tools import collect_results as C

BASE = {"dataset": "synthetic", "classes": ["a", "b"], "setting": "unified",
        "input_size": [64, 64], "epochs": 2, "reported": "final epoch (2)", "seed": 5,
        "image_score": "max(avgpool 16)", "backbone": "resnet18"}


def metrics(x):
    """All metrics of one row, distinct per row: x + small offsets (fractions)."""
    vals = {m: round(x + 0.01 * i, 6) for i, m in enumerate(C.METRIC_ORDER[:-1])}
    vals["mad"] = round(sum(vals.values()) / 7, 6)
    return vals


def write(path, protocol, per_class, extra=None):
    path.mkdir(parents=True, exist_ok=True)
    mean = {}
    for m in C.METRIC_ORDER:  # as utils.metrics.summarize: undefined values left out
        vals = [v[m] for v in per_class.values() if v[m] is not None]
        mean[m] = sum(vals) / len(vals) if vals else None
    data = {"protocol": protocol, "per_class": per_class, "mean": mean, **(extra or {})}
    (path / "results.json").write_text(json.dumps(data, indent=2))
    return data


@pytest.fixture
def tree(tmp_path):
    """A sweep (two cells), a per-class run (combined + its classes) and a unified run with one
    --evaluate folder, under one directory; plus files that are not results."""
    root = tmp_path / "exp"
    out = {}
    out["sweep/lr=0.001"] = write(root / "sweep" / "lr=0.001", BASE,
                                  {"a": metrics(0.80), "b": metrics(0.70)})
    out["sweep/lr=0.01"] = write(root / "sweep" / "lr=0.01", dict(BASE, epochs=4,
                                                                  reported="final epoch (4)"),
                                 {"a": metrics(0.60), "b": metrics(0.50)})
    (root / "sweep" / "sweep.json").write_text("{}")
    out["per_class"] = write(root / "per_class", dict(BASE, setting="per-class"),
                             {"a": metrics(0.90), "b": metrics(0.85)})
    for cls, x in (("a", 0.90), ("b", 0.85)):
        out[f"per_class/{cls}"] = write(root / "per_class" / cls,
                                        dict(BASE, classes=[cls], setting="single-class"),
                                        {cls: metrics(x)})
    out["unified"] = write(root / "unified", BASE, {"a": metrics(0.75), "b": metrics(0.65)},
                           {"best_on_test_set": {"note": "selected on the test set",
                                                 "mean": metrics(0.99)}})
    out["unified/evaluations/best-0101"] = write(
        root / "unified" / "evaluations" / "best-0101",
        dict(BASE, reported="checkpoint best.pth after 2 epochs"),
        {"a": dict(metrics(0.70), pixel_aupro=None), "b": dict(metrics(0.60), pixel_aupro=None)})
    (root / "unified" / "checkpoints").mkdir()
    (root / "unified" / "checkpoints" / "results.json").write_text("not results")  # skipped
    return root, out


def run(argv, capsys):
    code = C.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def md_rows(text):
    """Markdown table -> list of dicts (header row + body, separator skipped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, [c.strip() for c in ln.strip("|").split("|")])) for ln in lines[2:]]


def test_a_folder_is_searched_and_rows_labelled_relative_to_it(tree, capsys):
    root, data = tree
    code, out, err = run([root], capsys)
    assert code == 0, err
    rows = md_rows(out)
    assert [r["run"] for r in rows] == ["per_class", "per_class/a", "per_class/b",
                                        "sweep/lr=0.001", "sweep/lr=0.01", "unified",
                                        "unified/evaluations/best-0101"]
    # protocol keys that differ are columns; the rest is one protocol line
    head = list(rows[0])
    for key in ("classes", "setting", "epochs", "reported"):
        assert key in head
    for key in ("dataset", "seed", "backbone", "input_size", "image_score"):
        assert key not in head
    line = next(ln for ln in out.splitlines() if ln.startswith("protocol:"))
    assert "dataset=synthetic" in line and "seed=5" in line and "backbone=resnet18" in line
    assert "setting" not in line and "epochs" not in line
    assert "differs between runs: classes, setting, epochs, reported" in out
    by_run = {r["run"]: r for r in rows}
    for label, r in by_run.items():
        for m in C.METRIC_ORDER:
            v = data[label]["mean"][m]
            assert r[m] == ("n/a" if v is None else f"{100 * v:.2f}"), (label, m)
        assert r["setting"] == data[label]["protocol"]["setting"]
    assert by_run["per_class/a"]["classes"] == "a" and by_run["sweep/lr=0.01"]["epochs"] == "4"
    assert by_run["unified/evaluations/best-0101"]["pixel_aupro"] == "n/a"
    # the reported figures, never best_on_test_set (0.99...)
    reported = data["unified"]["mean"]["image_auroc"]
    assert by_run["unified"]["image_auroc"] == f"{100 * reported:.2f}"


def test_out_writes_markdown_csv_and_json_that_agree(tree, tmp_path, capsys):
    root, data = tree
    prefix = tmp_path / "tables" / "cmp"
    code, out, err = run([root / "sweep", root / "per_class", root / "unified", "--out", prefix,
                          "--per_class"], capsys)
    assert code == 0, err
    written = out.split()
    assert written == [str(prefix) + ext for ext in (".md", ".csv", ".json")]
    table = json.loads((tmp_path / "tables" / "cmp.json").read_text())
    csv_rows = list(csv.DictReader(io.StringIO((tmp_path / "tables" / "cmp.csv").read_text())))
    md = md_rows((tmp_path / "tables" / "cmp.md").read_text())
    assert len(table["rows"]) == len(csv_rows) == len(md)
    # several arguments: labels relative to the folder holding them all (no machine path);
    # --per_class: classes then the mean
    labels = [(r["run"], r["class"]) for r in table["rows"]]
    assert labels[:3] == [("sweep/lr=0.001", "a"), ("sweep/lr=0.001", "b"),
                          ("sweep/lr=0.001", "mean")]
    assert ("per_class", "mean") in labels and ("per_class/b", "b") in labels
    assert ("unified/evaluations/best-0101", "a") in labels
    # runs_dir and the files are seen from the output file's folder; outside a project the
    # runs folder goes by its name
    assert table["runs_dir"] == "exp"
    assert table["rows"][0]["file"] == "exp/sweep/lr=0.001/results.json"
    for t, c, m in zip(table["rows"], csv_rows, md):
        assert t["run"] == c["run"] == m["run"] and t["class"] == c["class"] == m["class"]
        label = t["run"]
        src = data[label]["mean"] if t["class"] == "mean" else data[label]["per_class"][t["class"]]
        for name in C.METRIC_ORDER:
            assert t[name] == src[name]
            if src[name] is None:
                assert c[name] == "" and m[name] == "n/a"
            else:
                assert float(c[name]) == src[name] and m[name] == f"{100 * src[name]:.2f}"
    assert table["varying"] == ["classes", "setting", "epochs", "reported"]
    assert table["protocol"]["dataset"] == "synthetic" and "setting" not in table["protocol"]


def test_run_folders_and_files_without_recursion(tree, capsys):
    root, _ = tree
    code, out, _ = run([root / "unified", root / "per_class" / "results.json", "--no_recurse",
                        "--format", "csv"], capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["run"] for r in rows] == ["unified", "per_class"]
    assert rows[0]["setting"] == "unified" and rows[1]["setting"] == "per-class"


def test_same_protocol_everywhere_has_no_protocol_columns(tree, capsys):
    root, _ = tree
    code, out, _ = run([root / "unified", "--no_recurse"], capsys)
    assert code == 0
    assert "every run has the same protocol" in out
    assert list(md_rows(out)[0]) == ["run"] + C.METRIC_ORDER
    assert md_rows(out)[0]["run"] == "."


@pytest.mark.parametrize("content, message", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "a JSON object is expected"),
    ('{"protocol": {}, "per_class": {}}', "missing mean"),
    ('{"protocol": {}, "per_class": {"a": {"image_auroc": "high"}}, "mean": {}}',
     "a.image_auroc = 'high' is not a number"),
    ('{"protocol": {"data": {"a": 3}}, "per_class": {}, "mean": {}}',
     "protocol.data must map each class to its counts"),
])
def test_malformed_results_exit_2_naming_the_file(tree, capsys, content, message):
    root, _ = tree
    bad = root / "sweep" / "broken" / "results.json"
    bad.parent.mkdir()
    bad.write_text(content)
    code, out, err = run([root], capsys)
    assert code == 2 and out == ""
    assert str(bad) in err and message in err and err.startswith("error: ")


def test_no_results_or_missing_path_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "run" / "checkpoints").mkdir(parents=True)
    code, _, err = run([empty], capsys)
    assert code == 2 and f"{empty}: no results.json under this folder" in err
    code, _, err = run([tmp_path / "nope"], capsys)
    assert code == 2 and "nope: no such file or folder" in err
    with pytest.raises(SystemExit) as exc:  # no argument at all: argparse's usage error
        C.main([])
    assert exc.value.code == 2


def test_command_line_prints_markdown_without_importing_torch(tree):
    root, _ = tree
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "collect_results.py"),
                           str(root / "sweep")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# Results of 2 run(s)")
    assert "| lr=0.001 " in proc.stdout
    probe = ("import sys; sys.path.insert(0, sys.argv[1] + '/tools'); import _checkout;"
             " from dualmem.tools import collect_results as c;"
             " c.main([sys.argv[2]]); print('torch' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe, str(ROOT), str(root / "sweep")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "False", proc.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "collect_results.py"),
                          str(root / "missing")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing: no such file or folder" in bad.stderr


def test_a_seen_anomaly_protocol_is_one_short_cell_and_whole_in_json(tmp_path, capsys):
    """seen_anomalies (a dict with the drawn file list) varies between a k = 1 and a k = 20
    run: the markdown cell names k and the file count, not every file; JSON keeps them all."""
    files = [f"a/test/crack/{i:03d}.png" for i in range(20)]
    for k in (1, 20):
        seen = {"num_per_class": k, "seed": 0, "classes": None, "join_training": True,
                "files": files[:k]}
        write(tmp_path / f"k{k}", dict(BASE, seen_anomalies=seen), {"a": metrics(0.5)})
    code, out, err = run([tmp_path / "k1", tmp_path / "k20"], capsys)
    assert code == 0, err
    cells = {r["run"]: r["seen_anomalies"] for r in md_rows(out)}
    assert cells["k1"] == ("classes=-, files=a/test/crack/000.png, join_training=True, "
                           "num_per_class=1, seed=0")
    assert cells["k20"].startswith("classes=-, files=20: a/test/crack/000.png,")
    assert "a/test/crack/019.png" not in cells["k20"] and "num_per_class=20" in cells["k20"]
    code, out, err = run([tmp_path / "k1", tmp_path / "k20", "--format", "json"], capsys)
    rows = json.loads(out)["rows"]
    assert rows[1]["protocol"]["seen_anomalies"]["files"] == files
