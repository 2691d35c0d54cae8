"""The architecture as documented: the toy head of docs/dev/add-method.md trains and evaluates from
YAML, models/ never reaches into datasets/ or the engine, modules (models/, utils/, datasets/,
tools/) stay small."""
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, synthetic_dataset, tiny_net


def test_models_and_utils_keep_their_boundaries():
    for path in (ROOT / "models").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import) dualmem(\.datasets\b| import datasets)",
                             text, re.M), path
        assert not re.search(r"^\s*(from|import) dualmem\.utils\.engine", text, re.M), path
    for path in (ROOT / "utils").glob("*.py"):  # only the engine imports the engine
        assert not re.search(r"^\s*(from|import) dualmem\.utils\.engine",
                             path.read_text(encoding="utf-8"), re.M), path
    for path in [*(ROOT / "models").rglob("*.py"), *(ROOT / "utils").rglob("*.py"),
                 *(ROOT / "datasets").rglob("*.py"), *(ROOT / "tools").rglob("*.py")]:
        n = len(path.read_text(encoding="utf-8").splitlines())
        assert n <= 400, f"{path.relative_to(ROOT)} has {n} lines"


PACKAGES = ("models", "datasets", "utils", "tools")


def test_dualmem_imports_itself_only_as_dualmem():
    """No module imports a DualMem package by its bare name (``utils``, ``models``, ...), so
    installed it never clashes with a user's own packages or Hugging Face ``datasets``, and
    never loads a second copy of a module (two registries) beside ``dualmem.*``."""
    import ast

    bare = []
    for path in [*(ROOT / "tests").glob("*.py"),
                 *(p for name in PACKAGES for p in (ROOT / name).rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bare += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert not bare, bare
    # every module imported from the checkout, in a fresh interpreter run from the root (the
    # worst case: the root is on sys.path): none of them under a bare name
    probe = ("import importlib, pkgutil, sys; sys.path.insert(0, sys.argv[1] + '/tools');"
             " import _checkout;"
             " done = [importlib.import_module(m.name) for p in " + repr(PACKAGES) + " for m"
             " in pkgutil.walk_packages([sys.argv[1] + '/' + p], 'dualmem.' + p + '.')];"
             " print(len(done));"
             " print(sorted(n for n in sys.modules if n.split('.')[0] in " + repr(PACKAGES) + "))")
    import subprocess
    proc = subprocess.run([sys.executable, "-c", probe, str(ROOT)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, loaded = proc.stdout.strip().splitlines()
    assert int(count) > 100 and loaded == "[]", proc.stdout


def test_a_tool_s_checkout_is_the_only_place_dualmem_loads_from(tmp_path):
    """tools/_checkout.py: a second checkout binds to itself; a module missing there is an
    error, not taken from the installed checkout; binding the installed checkout again after
    ``import dualmem.X`` went through the install is fine; another checkout then is refused."""
    import shutil
    import subprocess

    other = tmp_path / "other"
    for name in ("tools", "utils"):
        shutil.copytree(ROOT / name, other / name, ignore=shutil.ignore_patterns("__pycache__"))
    (other / "utils" / "plots.py").unlink()

    def run(code, cwd=tmp_path):
        return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                              text=True, timeout=120)

    bind_other = f"import sys; sys.path.insert(0, {str(other / 'tools')!r}); import _checkout; "
    proc = run(bind_other + "import dualmem.utils.errors as e; print(e.__file__)")
    assert proc.returncode == 0 and proc.stdout.strip() == str(other / "utils" / "errors.py")
    proc = run(bind_other + "import dualmem.utils.plots")
    assert proc.returncode != 0 and f"'dualmem.utils.plots' in the checkout {other}" in \
        proc.stderr
    # the README's editable install first, then its checkout's tool: the same checkout
    again = ("import sys, pathlib, dualmem.utils.errors as e;"
             " root = pathlib.Path(e.__file__).resolve().parents[1];"
             " sys.path.insert(0, str(root / 'tools')); import _checkout;"
             " import dualmem.utils.plots as p; print(root, p.__file__)")
    proc = run(again)
    assert proc.returncode == 0, proc.stderr
    root, plots = proc.stdout.split()
    assert plots == str(Path(root) / "utils" / "plots.py")
    proc = run("import dualmem.utils.errors; " + bind_other)
    assert proc.returncode != 0 and "dualmem is already imported from" in proc.stderr


@pytest.mark.slow
def test_the_toy_head_of_the_add_method_page_trains_and_evaluates_from_yaml(tmp_path, monkeypatch):
    from dualmem.tools import train_val

    readme = (ROOT / "docs" / "dev" / "add-method.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- toy-head -->\s*```python\n(.*?)```", readme, re.S).group(1)
    package = tmp_path / "toy_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "toy.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    net = tiny_net()[:2] + [{"name": "reconstruction", "prev": "neck",
                             "type": "toy_pkg.toy.ToyReconstruction", "kwargs": {"hidden": 8}}]
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump({
        "_base_": str(ROOT / "configs" / "runtime.yaml"),
        "dataset": synthetic_dataset(tmp_path / "data", seed=3),
        "trainer": {"max_epoch": 1, "val_freq_epoch": 1,
                    "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}},
        "net": net}))
    run = tmp_path / "run"
    common = ["--no_progress", "--device", "cpu"]
    # a config names code only by registry; the user's own module is trusted on the command
    # line, and without that it is refused before it is imported
    assert train_val.main(["--config", str(cfg), "--work_dir", str(tmp_path / "refused")]
                          + common) == 2
    assert "toy_pkg.toy" not in sys.modules and not (tmp_path / "refused").exists()
    common += ["--plugins", "toy_pkg"]
    assert train_val.main(["--config", str(cfg), "--work_dir", str(run)] + common) == 0
    res = json.loads((run / "results.json").read_text())
    assert set(res["per_class"]) == {"disc", "weave"}
    assert 0.0 <= res["mean"]["pixel_auroc"] <= 1.0
    assert res["protocol"]["epochs"] == 1
    assert train_val.main(["--work_dir", str(run), "--evaluate"] + common) == 0
    sys.modules.pop("toy_pkg.toy", None)
    sys.modules.pop("toy_pkg", None)


def test_each_extension_axis_is_declared_once():
    """The data sources and the metrics are listed in one place each; everything else reads
    those lists (issue #28 item 2)."""
    sources = re.compile(r"""["']mvtec["'],\s*["']visa["']""")
    metrics = re.compile(r"""["']image_auroc["'],\s*["']image_ap["'],\s*["']image_f1max["']""")
    found = {"sources": [], "metrics": []}
    for folder in ("models", "utils", "datasets", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            rel = str(path.relative_to(ROOT))
            found["sources"] += [rel] * len(sources.findall(text))
            found["metrics"] += [rel] * len(metrics.findall(text))
    assert found["sources"] == ["datasets/prepare/__init__.py"], found["sources"]
    # METRIC_NAMES, and the seven mAD averages (pinned on purpose, beside it)
    assert found["metrics"] == ["utils/metrics.py", "utils/metrics.py"], found["metrics"]
