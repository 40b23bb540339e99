"""Install the `fedselect` package from plugin/ with its `fedselect` console script.

Dependencies are pinned in requirements.txt (one place, with reasons) and installed by the
Makefile; fedml itself is installed there with --no-deps because its own pins are broken.
"""

from pathlib import Path

from setuptools import find_packages, setup

version_ns: dict = {}
exec((Path(__file__).parent / "plugin" / "fedselect" / "_version.py").read_text(), version_ns)

setup(
    name="fedselect",
    version=version_ns["__version__"],
    description="FedML plugin and reproducibility pipeline for selective fine-tuning in federated learning",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    package_dir={"": "plugin"},
    packages=find_packages("plugin"),
    python_requires=">=3.10",
    entry_points={"console_scripts": ["fedselect = fedselect.cli:main"]},
)
