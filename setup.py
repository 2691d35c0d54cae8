"""DualMem: unified (multi-class) industrial image anomaly detection, from one YAML file.

This installs the dependencies only; the code is used from the checkout (see README "Install").
"""
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
requirements = [
    line.split("#")[0].strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="dualmem",
    version="0.1.0",
    description="UniAD, DuMeNet and DMAD anomaly detection in one YAML-driven framework",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # DualMem runs from its checkout, as UniAD does: tools/*.py put the repo root on sys.path
    # and pytest (run from the repo root) finds the packages there. So nothing is installed but
    # the dependencies: top-level packages named models/datasets/utils/tools would overwrite
    # (and, on uninstall, remove) other distributions' packages, e.g. Hugging Face `datasets`.
    packages=[],
    py_modules=[],
    install_requires=requirements,
    license="Apache-2.0",
)
