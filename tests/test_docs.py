"""The pages under docs/ as written: every code block runs (python executed, tool commands
checked against the tool's --help, YAML/JSON parsed), is run by the test named beside it, or
says why not; each "how to add X" page adds a toy X through its extension point (issue #28)."""
import contextlib
import io
import json
import re
import sys
import types

import numpy as np
import pytest
import yaml

from conftest import ROOT, synthetic_dataset, tiny_net

DOCS = sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*([\w-]+)(?::\s*(.*?))?\s*-->")
# named blocks and the test file that runs each (the marker appears there)
CONSUMERS = {"api-example": "tests/test_export.py", "toy-head": "tests/test_architecture.py",
             "snippet": "tests/test_docs.py"}
SNIPPETS = {"toy-loss", "toy-source", "toy-metric", "toy-format"}
EXTERNAL = {"tensorboard"}  # not DualMem's: named only, never run here


def blocks():
    """(page, language, code, marker kind, marker argument) of every fenced block in docs/."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            before = text[:m.start()].rstrip().splitlines()
            last = before[-1].strip() if before else ""
            mk = MARKER.fullmatch(last)
            out.append((path.relative_to(ROOT).as_posix(), m.group(1), m.group(2),
                        mk.group(1) if mk else None, (mk.group(2) or "") if mk else ""))
    return out


def snippet(name):
    found = [code for _, _, code, kind, arg in blocks() if kind == "snippet" and arg == name]
    assert len(found) == 1, f"docs/ must hold one '<!-- snippet: {name} -->' block"
    return found[0]


def run_snippet(name, module_name=None):
    """Execute a named block as a module of its own; returns the module."""
    module = types.ModuleType(module_name or f"docs_{name.replace('-', '_')}")
    exec(compile(snippet(name), f"docs <!-- snippet: {name} -->", "exec"), module.__dict__)
    return module


def test_every_block_runs_or_says_why_not():
    found = blocks()
    assert len(DOCS) >= 11 and len(found) >= 20
    named = set()
    for page, lang, code, kind, arg in found:
        where = f"{page}: ```{lang} block starting {code[:40]!r}"
        if kind == "not-run":
            assert len(arg) > 10, f"{where}: a not-run block must say why"
        elif kind in CONSUMERS:
            consumer = (ROOT / CONSUMERS[kind]).read_text(encoding="utf-8")
            assert f"<!-- {kind}" in consumer or kind == "snippet", where
            if kind == "snippet":
                assert arg in SNIPPETS, f"{where}: no test runs snippet '{arg}'"
                named.add(arg)
        else:
            assert kind is None, f"{where}: unknown marker '{kind}'"
            assert lang in ("python", "bash", "yaml", "json", "text"), \
                f"{where}: unknown block language (use text for output or layouts)"
    assert named == SNIPPETS, f"snippets run by this file but missing from docs/: " \
                              f"{SNIPPETS - named}"


def unmarked(lang):
    return [(page, code) for page, lang_, code, kind, _ in blocks()
            if kind is None and lang_ == lang]


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    codes = unmarked("python")
    assert codes
    for page, code in codes:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, page, "exec"), {"__name__": "docs"})


def test_yaml_and_json_blocks_parse():
    for page, code in unmarked("yaml"):
        assert isinstance(yaml.safe_load(code), (dict, list)), page
    for page, code in unmarked("json"):
        json.loads(code)


def tool_help(name):
    module = __import__(f"dualmem.tools.{name}", fromlist=["main"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0, name
    return out.getvalue()


def command_lines(code):
    """Logical lines of a bash block: continuations joined, comments dropped."""
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            yield line


def test_tool_commands_name_real_flags():
    """Every tools/*.py command in docs/ starts (--help) and uses only flags its help lists."""
    helps, checked = {}, 0
    for page, code in unmarked("bash"):
        for line in command_lines(code):
            m = re.search(r"tools/(\w+)\.py(.*)", line)
            if not m:
                assert line.split()[0] in EXTERNAL, f"{page}: '{line}' names no DualMem tool"
                continue
            name, rest = m.groups()
            if name not in helps:
                helps[name] = tool_help(name)
            for flag in re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", rest):
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[name]), \
                    f"{page}: {line}: tools/{name}.py --help lists no {flag}"
            checked += 1
    assert checked >= 10


# ----------------------------------------------------------------------------- the four axes
def test_a_toy_loss_registers_and_trains():
    import torch

    from dualmem.models.losses import LOSSES, Criterion

    run_snippet("toy-loss")
    try:
        text = (ROOT / "docs/dev/add-method.md").read_text(encoding="utf-8")
        cfg = yaml.safe_load(re.search(r"```yaml\n(criterion:.*?)```",
                                       text.split("snippet: toy-loss", 1)[1], re.S).group(1))
        criterion = Criterion(cfg["criterion"])
        torch.manual_seed(0)
        head = torch.nn.Conv2d(4, 4, 1)
        x = torch.randn(2, 4, 5, 5)
        total, parts = criterion({"feature_align": x, "feature_rec": head(x)})
        assert set(parts) == {"l1"} and total.item() > 0
        total.backward()
        assert head.weight.grad.abs().sum() > 0
    finally:
        LOSSES._entries.pop("ToyL1Loss", None)


def test_a_toy_dataset_source_builds_checks_and_caches(tmp_path, monkeypatch):
    import cv2

    import dualmem.datasets.prepare as prepare
    from dualmem.datasets.prepare import build_source, check_records, write_prepared
    from dualmem.datasets.prepare.cache import prepare_one

    toy = run_snippet("toy-source", "dualmem.datasets.prepare.toy")
    monkeypatch.setitem(sys.modules, "dualmem.datasets.prepare.toy", toy)
    monkeypatch.setattr(prepare, "SOURCES", prepare.SOURCES + ("toy",))
    root = tmp_path / "widget"
    rng = np.random.default_rng(0)
    for sub, n in (("train", 3), ("test/good", 2), ("test/bad", 1)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / sub / f"{i}.png"), rng.integers(0, 255, (16, 16, 3), np.uint8))
    prepared = build_source("toy", root)
    assert [len(prepared.train), len(prepared.test)] == [3, 3]
    assert sorted(r["label"] for r in prepared.test) == [0, 0, 1]
    check_records(prepared)
    write_prepared(prepared, tmp_path / "manifests")
    assert len((tmp_path / "manifests" / "train.json").read_text().splitlines()) == 3
    assert prepare_one("toy", root, cache_dir=tmp_path / "cache")  # what --data_root runs
    with pytest.raises(prepare.PrepareError, match="one class"):
        build_source("toy", root, classes=["other"])


def test_a_toy_metric_reaches_the_result_tables(monkeypatch):
    from dualmem.tools import collect_results
    from dualmem.utils import evaluator, metrics
    from dualmem.utils.ranking_curve import _build_curve, _to_numpy
    from dualmem.utils.results import results_table

    tpr_at_fpr = run_snippet("toy-metric").tpr_at_fpr
    toy = "image_tpr_at_5fpr"
    names = metrics.METRIC_NAMES[:3] + [toy] + metrics.METRIC_NAMES[3:]
    original = metrics.compute_class_metrics

    def compute(image_scores, image_labels, maps=None, masks=None, metrics=names):
        """compute_class_metrics with the page's one added line."""
        out = original(image_scores, image_labels, maps, masks,
                       metrics=[m for m in metrics if m != toy])
        if toy in metrics:
            c = _build_curve(np.ravel(_to_numpy(image_scores)), np.ravel(_to_numpy(image_labels)))
            out[toy] = tpr_at_fpr(*c.roc_xy()) if c.valid else None
        return {m: out[m] for m in metrics}

    for module in (metrics, evaluator):
        monkeypatch.setattr(module, "METRIC_NAMES", names)
        monkeypatch.setattr(module, "compute_class_metrics", compute)
    monkeypatch.setattr(metrics, "IMAGE_METRICS", [m for m in names if m.startswith("image_")])
    monkeypatch.setattr(metrics, "TABLE_METRICS", names + ["mad"])
    monkeypatch.setattr(collect_results, "METRIC_ORDER", names + ["mad"])

    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 10)
    scores = np.r_[rng.random(20), rng.random(10) + 0.5]
    inf = {"clsname": ["a"] * 15 + ["b"] * 15, "label": np.r_[labels[::2], labels[1::2]],
           "score": np.r_[scores[::2], scores[1::2]], "maps": None, "masks": None}
    per_class, mean = evaluator.metrics_from_inference(inf, ["image_auroc", toy])
    for cls in ("a", "b"):
        sel = np.asarray(inf["clsname"]) == cls
        curve = metrics.ranking_curves(inf["score"][sel], inf["label"][sel])
        assert per_class[cls][toy] == tpr_at_fpr(*curve["roc"])
    assert mean[toy] == pytest.approx((per_class["a"][toy] + per_class["b"][toy]) / 2)
    assert mean["mad"] is None  # the seven published metrics, unchanged
    header = results_table({"per_class": per_class, "mean": mean}).splitlines()[0]
    assert toy in header
    assert toy in collect_results.METRIC_ORDER and \
        collect_results.METRIC_ORDER.index(toy) < collect_results.METRIC_ORDER.index("mad")


@pytest.mark.slow
def test_a_toy_export_format_exports_and_loads_back(tmp_path, monkeypatch):
    import cv2

    from dualmem.tools import train_val
    from dualmem.utils import exported_model
    from dualmem.utils.detector import load_detector
    from dualmem.utils.exported_model import ExportedModel, run_exported
    from dualmem.utils.exporting import export_checkpoint

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "_base_": str(ROOT / "configs" / "runtime.yaml"), "random_seed": 5,
        "dataset": synthetic_dataset(tmp_path / "data", seed=4),
        "trainer": {"max_epoch": 1, "val_freq_epoch": 1}, "net": tiny_net()}))
    run = tmp_path / "run"
    assert train_val.main(["--config", str(cfg), "--work_dir", str(run), "--no_progress",
                           "--device", "cpu"]) == 0

    monkeypatch.setitem(exported_model.FORMATS, "frozen", run_snippet("toy-format").FROZEN)
    result = export_checkpoint(run, "frozen")
    assert result.written, result.problems
    assert result.output == run / "export" / "last.frozen.pt" and result.output.is_file()
    model = ExportedModel(result.output)
    assert model.format == "frozen" and model.meta["format"] == "frozen"
    image = sorted((tmp_path / "data").glob("*/test/*/*.png"))[-1]
    maps, scores = run_exported(model, [str(image)])
    assert maps.shape == (1, 64, 64)
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    assert scores[0] == pytest.approx(load_detector(run).predict(rgb).score, rel=1e-4, abs=1e-6)


def test_readme_stays_what_a_newcomer_reads():
    """At most 150 lines (issue #28): the reference lives in docs/, linked from it."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move reference to docs/"
    text = "\n".join(lines)
    for page in ("docs/user/runs.md", "docs/dev/architecture.md", "docs/dev/add-method.md"):
        assert f"]({page})" in text and (ROOT / page).is_file(), page
