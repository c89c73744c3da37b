"""Object detection: the torch half (model builder, training entry point, run loading, export wrapper)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lensforge.tasks.detection import DetectionHead


class DetectorExport(nn.Module):
    """What the ONNX exporter wraps: normalised float input -> the raw outputs, in contract order.

    ``(cls_logits, box_ltrb, centerness, features)``, see :data:`lensforge.tasks.detection.RAW_OUTPUTS`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cls_logits, box_ltrb, centerness, features = self.model(x)
        return cls_logits, box_ltrb, centerness, features


class DetectionTorch:
    """The detection task's torch half, reached through ``get_task("detection").torch()``."""

    def train(self, cfg: Any, **kwargs: Any) -> Any:
        from lensforge.train.detection.trainer import train_detector

        return train_detector(cfg, **kwargs)

    def build_model(self, name: str, num_classes: int, in_chans: int = 3, pretrained: str | None = None) -> nn.Module:
        from lensforge.models.detector import create_detector

        return create_detector(name, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained)

    def load_run_model(self, run_dir: str | Path) -> tuple[nn.Module, DetectionHead]:
        """The finished run's detector (final weights, eval mode) and its detection head, from its own files."""
        from safetensors.torch import load_file

        from lensforge.data.preprocess import Preprocess
        from lensforge.errors import ArtifactError
        from lensforge.train.run import WEIGHTS_FILE, read_run_info

        run_dir = Path(run_dir)
        info = read_run_info(run_dir)
        if info.get("task") != "detection" or "detection" not in info:
            raise ArtifactError(f"'{run_dir}' is not a detection run (task {info.get('task')!r})")
        weights = run_dir / WEIGHTS_FILE
        if not weights.exists():
            raise ArtifactError(f"run '{run_dir}' has no final weights ({WEIGHTS_FILE}): training did not "
                                f"finish; continue it with `lensforge train --resume --out {run_dir}`")
        pre = Preprocess.from_dict(info["preprocess"])
        model = self.build_model(info["model"], len(info["class_names"]), pre.channels)  # weights: from the run
        try:
            model.load_state_dict(load_file(weights))
        except (RuntimeError, OSError) as e:
            raise ArtifactError(f"'{weights}' does not fit detector '{info['model']}': "
                                f"{str(e).splitlines()[0]}") from None
        return model.eval(), DetectionHead.from_dict(info["detection"])

    def export_module(self, model: nn.Module) -> nn.Module:
        return DetectorExport(model)


TASK = DetectionTorch()
