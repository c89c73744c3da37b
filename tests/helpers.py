"""Small helpers shared by tests (importable: tests/ is on pythonpath)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
