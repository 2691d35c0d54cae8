"""DualMem: unified (multi-class) industrial image anomaly detection, from one YAML file."""
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
    packages=["models", "models.backbones", "models.necks", "models.reconstructions",
              "models.heads", "datasets", "utils", "tools"],
    install_requires=requirements,
    license="Apache-2.0",
)
