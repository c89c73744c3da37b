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
