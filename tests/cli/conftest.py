"""A tiny run trained and exported through the console entry point, once per test module that asks for it."""

from __future__ import annotations

import pytest
from helpers import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Module-scoped: each module gets its own run, since its tests write variants and stress results into it."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run("train", "--data", "builtin:digits", "--model", "tinycnn_xs", "--image-size", "8", "--epochs", "3",
                 "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr
    assert run("export", str(out)).returncode == 0
    return out
