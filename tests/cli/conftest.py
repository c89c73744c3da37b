"""The session's tiny digits run, copied once per CLI test module that asks for it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def trained(digits_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tinycnn_xs on 8 px digits, 3 epochs, exported; each module writes variants and stress results into its copy.

    Trained through the API (tests/conftest.py); ``train`` and ``export`` through the console
    script are checked once, in test_cli.py.
    """
    return Path(shutil.copytree(digits_run_template, tmp_path_factory.mktemp("cli") / "run"))
