"""The deployment host's install: the core and the `serve` extra need no torch; missing extras get a hint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TRAINING_STACK = {"torch", "torchvision", "timm", "torchmetrics", "onnx", "onnxscript", "torch-pruning", "pytorch-ood",
                  "scikit-learn", "scipy", "matplotlib"}


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower() for r in requirements}


def test_core_and_serve_extra_do_not_pull_the_training_stack():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    assert not _names(project["dependencies"]) & TRAINING_STACK
    assert not _names(extras["serve"]) & TRAINING_STACK
    assert {"torch", "timm", "onnx"} <= _names(extras["train"])


def test_a_command_whose_extra_is_missing_says_how_to_install_it(tmp_path):
    code = (
        "import sys\n"
        "for name in ('torch', 'jinja2', 'sklearn', 'yaml'):\n"
        "    sys.modules[name] = None  # as on a host with only the core installed\n"
        "sys.argv = ['lensforge', 'train', '--data', 'builtin:digits', '--out', sys.argv[1]]\n"
        "from lensforge.cli import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "pip install 'lensforge[train]'" in result.stderr and "Traceback" not in result.stderr
