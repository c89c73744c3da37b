"""Shared fixtures: tiny image folders written with Pillow, and one thread for torch."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: see lensforge.cli.quiet_cpu_threads
from pathlib import Path

import pytest
from helpers import write_image_folder


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "imgs")


@pytest.fixture(scope="session")
def digits_run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny trained and exported digits run (tinycnn_xs, 8 px, 3 epochs) for the whole session.

    Read-only: tests that write into a run (calibrate, guard, stress) take ``digits_run``, a copy.
    """
    from lensforge.deploy.from_run import export_run
    from lensforge.train import resolve_config, train

    out = tmp_path_factory.mktemp("digits-template") / "run"
    train(resolve_config(None, data="builtin:digits", model="tinycnn_xs", image_size=8, epochs=3, out=str(out)),
          show_progress=False)
    export_run(out)
    return out


@pytest.fixture(scope="module")
def digits_run(digits_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the session's digits run, per test module (it may be calibrated, guarded, stressed)."""
    import shutil

    return Path(shutil.copytree(digits_run_template, tmp_path_factory.mktemp("digits") / "run"))
