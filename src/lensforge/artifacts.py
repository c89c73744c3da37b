"""What a path given to a command is: a run folder, a bundle, or a bundle inside a run.

Every command that takes "a run or a bundle" asks :func:`resolve_artifact` once, instead
of each answering the question its own way. Torch-free: a deployment host resolves
bundles too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensforge.deploy.bundle import MANIFEST_NAME, is_bundle, read_manifest
from lensforge.errors import ArtifactError, UsageError

RUN_FILE = "run.json"  # as lensforge.train.run, which imports torch
BUNDLE_DIR = "bundle"  # where `lensforge export` puts a run's bundle


@dataclass(frozen=True)
class Artifact:
    """A resolved run or bundle.

    Attributes:
        path: what was given.
        kind: "run" or "bundle".
        run_dir: the run folder: ``path`` itself, or the run a bundle sits in (or was named with); None if none.
        bundle_dir: the bundle: ``path`` itself, or a run's exported ``RUN/bundle``; None if not exported.
    """

    path: Path
    kind: str
    run_dir: Path | None
    bundle_dir: Path | None

    @property
    def is_bundle(self) -> bool:
        return self.kind == "bundle"

    def run_info(self) -> dict[str, Any]:
        """The run's ``run.json`` ({} for a bundle outside any run)."""
        if self.run_dir is None:
            return {}
        try:
            return json.loads((self.run_dir / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{self.run_dir / RUN_FILE}: cannot be read ({e})") from None

    @property
    def task(self) -> str:
        """The task the artifact was made for (runs and bundles before tasks were recorded: classification)."""
        if self.is_bundle:
            return str(read_manifest(self.path).get("task", "classification"))
        return str(self.run_info().get("task", "classification"))


def is_run(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def resolve_artifact(path: str | os.PathLike[str], *, run_dir: str | os.PathLike[str] | None = None,
                     what: str = "a run folder or a bundle") -> Artifact:
    """Resolve ``path``; ``run_dir`` names the run of a bundle kept outside it (a shipped variant).

    Raises:
        UsageError: ``path`` does not exist or is neither (the message says ``what`` was expected).
        ArtifactError: a ``manifest.json`` that is not a lensforge bundle.
    """
    folder = Path(path)
    if not folder.exists():
        raise UsageError(f"{path}: no such file or folder (give {what})")
    if is_bundle(folder):
        owner = Path(run_dir) if run_dir is not None else folder.parent if is_run(folder.parent) else None
        return Artifact(folder, "bundle", owner, folder)
    if is_run(folder):
        exported = folder / BUNDLE_DIR
        return Artifact(folder, "run", folder, exported if is_bundle(exported) else None)
    if (folder / MANIFEST_NAME).is_file():
        read_manifest(folder)  # raises the ArtifactError saying what is wrong with it
        raise ArtifactError(f"bundle {path}: not a lensforge bundle")
    raise UsageError(f"{path}: neither a run folder (no {RUN_FILE}) nor a bundle (no {MANIFEST_NAME}); "
                     f"give {what}")


__all__ = ["BUNDLE_DIR", "RUN_FILE", "Artifact", "is_run", "resolve_artifact"]
