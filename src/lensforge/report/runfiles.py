"""Lazy, read-only access to the files of one run folder.

Every file is optional: a missing file reads as None, so each report section can
decide for itself whether it has enough to show. A file that exists but cannot be
parsed raises :class:`ArtifactError` naming it. Paths taken from the run's own
JSON (e.g. mistake thumbnails) must stay inside the run folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lensforge.errors import ArtifactError
from lensforge.utils.io import read_jsonl


class RunFiles:
    """The files of a run folder, each read on first use and cached."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir).resolve()
        if not self.dir.is_dir():
            raise ArtifactError(f"run folder {run_dir} does not exist or is not a folder")
        self._cache: dict[str, Any] = {}

    def path(self, relpath: str) -> Path:
        """``relpath`` inside the run folder; raises if it points outside it."""
        target = (self.dir / relpath).resolve()
        if not target.is_relative_to(self.dir):
            raise ArtifactError(f"{relpath!r} points outside the run folder {self.dir}")
        return target

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).is_file()

    def text(self, relpath: str) -> str | None:
        """A text file's content, or None when it is missing."""
        return self._cached("text", relpath, self._read_text)

    def bytes(self, relpath: str) -> bytes | None:
        """A binary file's content (not cached: images are read once), or None."""
        target = self.path(relpath)
        return target.read_bytes() if target.is_file() else None

    def json(self, relpath: str) -> Any:
        """A JSON file's content, or None when it is missing."""
        return self._cached("json", relpath, self._read_json)

    def jsonl(self, relpath: str) -> list[dict[str, Any]] | None:
        """A JSON-lines file's rows (torn lines skipped), or None when missing or empty."""
        return self._cached("jsonl", relpath, self._read_jsonl)

    @property
    def run(self) -> dict[str, Any] | None:
        """``run.json``: name, model, data, class names, preprocessing, versions, timings."""
        return self._dict("run.json")

    @property
    def config_text(self) -> str | None:
        """``config.yaml``, the resolved training config, as text."""
        return self.text("config.yaml")

    @property
    def metrics(self) -> list[dict[str, Any]] | None:
        """``metrics.jsonl``: one row per epoch."""
        return self.jsonl("metrics.jsonl")

    @property
    def health(self) -> dict[str, Any] | None:
        """``health.json``: gradient-norm history, events and diagnosis sentences."""
        return self._dict("health.json")

    @property
    def diagnosis(self) -> dict[str, Any] | None:
        """``diagnosis.json``: fit diagnoses with suggestions, health sentences."""
        return self._dict("diagnosis.json")

    @property
    def manifest(self) -> dict[str, Any] | None:
        """``bundle/manifest.json``: the exported bundle's self-description."""
        return self._dict("bundle/manifest.json")

    @property
    def evals(self) -> dict[str, dict[str, Any]]:
        """``eval/<split>.json`` by split name, ``test`` first, then the others sorted."""
        folder = self.path("eval")
        if not folder.is_dir():
            return {}
        names = sorted(p.stem for p in folder.glob("*.json") if p.is_file())
        names.sort(key=lambda name: name != "test")  # stable: test first, rest stay sorted
        evals = {name: self._dict(f"eval/{name}.json") for name in names}
        return {name: data for name, data in evals.items() if data is not None}

    def _dict(self, relpath: str) -> dict[str, Any] | None:
        data = self.json(relpath)
        if data is not None and not isinstance(data, dict):
            raise ArtifactError(f"{self.path(relpath)} should hold a JSON object")
        return data

    def _cached(self, kind: str, relpath: str, read: Callable[[Path], Any]) -> Any:
        key = f"{kind}:{relpath}"
        if key not in self._cache:
            target = self.path(relpath)
            self._cache[key] = read(target) if target.is_file() else None
        return self._cache[key]

    @staticmethod
    def _read_text(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ArtifactError(f"{path} is not UTF-8 text: {err}") from None

    @classmethod
    def _read_json(cls, path: Path) -> Any:
        try:
            return json.loads(cls._read_text(path))
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{path} is not valid JSON: {err}") from None

    @staticmethod
    def _read_jsonl(path: Path) -> list[dict[str, Any]] | None:
        rows = [row for row in read_jsonl(path) if isinstance(row, dict)]
        return rows or None
