"""The run folder: what training writes, and how later stages load it back.

A run folder describes itself: ``run.json`` (model, data, classes, preprocessing,
versions, timings), ``config.yaml``, ``splits.json``, ``metrics.jsonl``,
``health.json``, ``diagnosis.json``, ``model.safetensors`` (the final weights),
``checkpoints/`` and later ``eval/``, ``bundle/`` and ``report.html``.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from lensforge.data.preprocess import Preprocess
from lensforge.errors import ArtifactError
from lensforge.utils.io import atomic_write_json

RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"


def versions() -> dict[str, str]:
    import timm
    import torch

    from lensforge import __version__

    return {"lensforge": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise ArtifactError(f"'{run_dir}' is not a lensforge run (no {RUN_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"'{path}' is damaged: {e}") from None


def update_run_info(run_dir: Path, **fields: Any) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    info = json.loads(path.read_text()) if path.exists() else {}
    info.update(fields)
    atomic_write_json(path, info)
    return info


@dataclass
class LoadedRun:
    """A finished run, loaded: the model with its final weights and how to feed it."""

    path: Path
    info: dict[str, Any]
    model: nn.Module
    preprocess: Preprocess

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def task(self) -> str:
        return str(self.info.get("task", "classification"))

    def export_module(self) -> nn.Module:
        """The model as its task exports it (normalised input -> the bundle's named outputs)."""
        from lensforge.tasks import get_task

        return get_task(self.task).torch().export_module(self.model, self.info)


def apply_structure(model: nn.Module, ops: list[dict[str, Any]], pre: Preprocess) -> nn.Module:
    """Give a fresh registry model the shape a run recorded (e.g. after structured pruning)."""
    if not ops:
        return model
    import torch

    from lensforge.models.prune import replay_structure

    example = torch.zeros(1, pre.channels, *pre.input_size)
    return replay_structure(model, ops, example)


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild the model of a finished run from its own files."""
    from safetensors.torch import load_file

    from lensforge.tasks import get_task

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if not weights.exists():
        raise ArtifactError(f"run '{run_dir}' has no final weights ({WEIGHTS_FILE}): training did not "
                            f"finish; continue it with `lensforge train --resume --out {run_dir}`")
    pre = Preprocess.from_dict(info["preprocess"])
    task = get_task(str(info.get("task", "classification"))).torch()
    model = task.build_model(info["model"], num_classes=len(info["class_names"]), in_chans=pre.channels)
    model = apply_structure(model, info.get("structure") or [], pre)
    try:
        model.load_state_dict(load_file(weights))
    except (RuntimeError, OSError) as e:
        raise ArtifactError(f"'{weights}' does not fit model '{info['model']}': {str(e).splitlines()[0]}") from None
    model.eval()
    return LoadedRun(run_dir, info, model, pre)
