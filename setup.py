"""DualMem: unified (multi-class) industrial image anomaly detection, from one YAML file.

``pip install -e .`` installs the dependencies and maps the import package ``dualmem`` to this
checkout: ``from dualmem.utils.detector import load_detector`` works from any working
directory. The folders keep the layout UniAD users know (models/, datasets/, utils/, tools/ at
the top); installed, they are ``dualmem.models`` etc., never top-level ``models``, ``utils`` or
``datasets`` that would clash with a user's own modules or Hugging Face ``datasets``.
"""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
PACKAGES = ["models", "datasets", "utils", "tools"]  # installed as dualmem.<name>
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
    python_requires=">=3.10",  # torch 2.14
    packages=["dualmem." + p
              for p in find_packages(include=PACKAGES + [p + ".*" for p in PACKAGES])],
    package_dir={"dualmem." + p: p for p in PACKAGES},
    install_requires=requirements,
    license="Apache-2.0",
)
