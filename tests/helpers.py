"""Small helpers shared by tests (importable: tests/ is on pythonpath)."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, size: int = 12,
                       split: str | None = None) -> Path:
    """root/[split/]<class>/<i>.png with distinguishable colours per class."""
    rng = np.random.default_rng(0)
    base = root / split if split else root
    for c, name in enumerate(classes):
        folder = base / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            arr[..., c % 3] += 150
            Image.fromarray(arr).save(folder / f"{i}.png")
    return root


def tree_digest(root: Path) -> str:
    """Hash of every file's path, bytes and mtime under root (to prove we never modify data)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


LENSFORGE = shutil.which("lensforge", path=str(Path(sys.executable).parent)) or "lensforge"


def run(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed ``lensforge`` console script (a real subprocess)."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([LENSFORGE, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env,
                          check=False)


def wait_for(condition: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until it is true; fail, naming ``what``, if it is not within ``timeout_s`` (a bound only)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {timeout_s:g} s")
        time.sleep(0.005)


def slow_fixture(function: Callable[..., Any] | None = None, **options: Any) -> Any:
    """``pytest.fixture`` for a fixture that trains, exports, fits guardrails or starts a server.

    Every test that uses it, directly or through another fixture, is marked ``slow`` (see
    tests/conftest.py), so ``make test-quick`` leaves it out.
    """

    def declare(fixture_function: Callable[..., Any]) -> Any:
        fixture_function.slow = True  # read back from the fixture's definition by pytest_collection_modifyitems
        return pytest.fixture(**options)(fixture_function)

    return declare(function) if function is not None else declare


def _extra_installed(extra: str) -> bool:
    """True when every distribution lensforge's ``extra`` asks for is installed (``dev``: train's and serve's too)."""
    from packaging.requirements import Requirement

    wanted = [Requirement(text) for text in metadata.requires("lensforge") or []]
    wanted = [r for r in wanted if "extra" in str(r.marker) and r.marker.evaluate({"extra": extra})]
    for requirement in wanted:
        if requirement.name == "lensforge":
            if not all(_extra_installed(inner) for inner in requirement.extras):
                return False
            continue
        try:
            metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            return False
    return bool(wanted)


def require_extra(module: str, extra: str) -> ModuleType:
    """Import ``module``, which lensforge's optional ``extra`` installs.

    Fails the test when the extra is installed (``make venv`` installs dev and pretrained)
    but the module does not import; skips, naming the extra, only when it is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        problem = str(error)  # reported below, outside the except block: one message, no chained traceback
    if _extra_installed(extra):
        pytest.fail(f"{module} does not import although lensforge[{extra}] is installed: {problem}", pytrace=False)
    pytest.skip(f"needs lensforge[{extra}]: pip install 'lensforge[{extra}]'", allow_module_level=True)
