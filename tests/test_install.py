"""Installing DualMem must be harmless to other packages (issue #14 item 6) and give the API to
any working directory (issue #26).

Everything DualMem installs lives under the one import package ``dualmem`` (``dualmem.models``,
``dualmem.utils``, ...): a top-level ``models``, ``datasets``, ``utils`` or ``tools`` in
site-packages would overwrite another distribution's package (Hugging Face ``datasets``, say),
take it away again on uninstall, and clash with a user's own ``utils``. The wheel is built
offline from a temporary copy of the repository, so no build/ or *.egg-info is left in the
checkout.
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# what `pip install .` must never write into site-packages
REPO_PACKAGES = ("models", "datasets", "utils", "tools", "configs", "data", "experiments", "tests")

_NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
    "data", "runs", "work_dirs", "*.pth",
)


def _requirement_names(lines):
    """Lower-cased distribution names of requirement lines (comments and blanks skipped)."""
    names = []
    for line in lines:
        line = line.split("#")[0].split(";")[0].strip()
        if line:
            names.append(re.split(r"[\s\[<>=!~(]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_COPIED)
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
           "-q", "-w", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"building the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("dualmem-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_installs_one_package_dualmem_and_nothing_top_level(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    shadowing = sorted(t for t in tops if t.split(".")[0] in REPO_PACKAGES)
    assert not shadowing, f"the wheel installs top-level {shadowing} into site-packages"
    assert {t for t in tops if not t.endswith(".dist-info")} == {"dualmem"}, tops
    assert not any(n.endswith(".pth") for n in names), names
    for module in ("models/registry.py", "models/heads/dmad.py", "utils/detector.py",
                   "datasets/prepare/__init__.py", "tools/_common.py"):
        assert f"dualmem/{module}" in names, module
    assert not any(n.startswith(("dualmem/tests/", "dualmem/experiments/")) for n in names)


def test_installed_wheel_imports_from_any_folder_beside_the_user_s_own_utils(wheel, tmp_path):
    target, user = tmp_path / "site", tmp_path / "project"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                           "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (user / "utils").mkdir(parents=True)
    (user / "utils" / "__init__.py").write_text("WHO = 'mine'\n")
    probe = ("import utils, dualmem.models.registry as r, dualmem.utils.errors as e;"
             " from dualmem.datasets.builder import default_synthetic_root as d;"
             " print(utils.WHO, r.__file__, e.UserError.__module__, d())")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           "PYTHONPATH": str(target)}  # before site-packages (and an editable install there)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=user, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    who, registry_file, module, synthetic = proc.stdout.split()
    assert who == "mine" and module == "dualmem.utils.errors"
    assert Path(synthetic) == user / "data" / "synthetic"  # the demo data: not in site-packages
    assert Path(registry_file).resolve().is_relative_to(target.resolve())


def test_wheel_requires_the_dependencies(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    assert meta["Name"].lower() == "dualmem"
    required = _requirement_names(meta.get_all("Requires-Dist") or [])
    expected = _requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    assert "torch" in required and "torchvision" in required
    assert sorted(required) == sorted(expected)
    # the torch/torchvision pins survive into the metadata
    pins = {r.split(";")[0].replace(" ", "") for r in meta.get_all("Requires-Dist")}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith(("torch==", "torchvision==")):
            assert line in pins, (line, pins)
