"""Object detection: the torch half (model builder, training entry point, run loading, export wrapper)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lensforge.tasks.detection import RAW_OUTPUTS, DetectionHead


class DetectorExport(nn.Module):
    """What the ONNX exporter wraps: normalised float input -> the raw outputs, in contract order.

    ``(cls_logits, box_ltrb, centerness, features)``, see :data:`lensforge.tasks.detection.RAW_OUTPUTS`.
    With the run's :class:`DetectionHead` it is a task export module for
    :func:`lensforge.deploy.export.write_bundle`: the head goes into the manifest, and parity
    means the same boxes after the shipped NumPy decoding, not only close raw outputs.
    """

    output_names = (*RAW_OUTPUTS, "features")

    def __init__(self, model: nn.Module, head: DetectionHead | None = None) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.eval()  # the wrapper too: an exporter that restores the wrapper's mode must not put BN in training

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cls_logits, box_ltrb, centerness, features = self.model(x)
        return cls_logits, box_ltrb, centerness, features

    def manifest_entries(self, x: torch.Tensor, outputs: dict[str, torch.Tensor],
                         class_names: Sequence[str]) -> dict[str, Any]:
        from lensforge.errors import UsageError

        if self.head is None:
            raise UsageError("exporting a detector needs its DetectionHead (the run's `detection` entry)")
        if outputs["cls_logits"].shape[-1] != len(class_names):
            raise UsageError(f"the detector scores {outputs['cls_logits'].shape[-1]} classes but "
                             f"{len(class_names)} class names were given")
        if outputs["cls_logits"].shape[1] != self.head.num_points:
            raise UsageError(f"the detector has {outputs['cls_logits'].shape[1]} anchor points, its head "
                             f"{self.head.num_points}: the head is not this model's at this input size")
        return {"detection": self.head.to_dict()}

    def parity(self, ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], atol: float) -> dict[str, Any]:
        """Raw outputs close, and the same detections after the shipped decoding (boxes within 0.5 px).

        Box distances are in pixels, so their tolerance scales with the input (``atol`` per 100 px
        of box side); class and centre-ness logits are held to ``atol`` itself, as a classifier's are.
        """
        from lensforge.errors import ExportError
        from lensforge.tasks.detection import postprocess

        assert self.head is not None
        diffs = {f"max_abs_diff_{name}": float(np.abs(ours[name] - theirs[name]).max()) for name in ours}
        n = len(ours["cls_logits"])
        side = float(max(self.head.levels[0][1], self.head.levels[0][2]) * self.head.levels[0][0])
        geometry = {"scales": [1.0] * n, "sizes": [(int(side), int(side))] * n}
        a = postprocess(ours, self.head, **geometry, score_threshold=self.head.score_threshold)
        b = postprocess(theirs, self.head, **geometry, score_threshold=self.head.score_threshold)
        same = [_same_detections(x, y, self.head.score_threshold, atol) for x, y in zip(a, b)]
        result = {**diffs, "same_detections": float(np.mean(same)), "detections": int(sum(len(x) for x in a))}
        logit_diff = max(diffs["max_abs_diff_cls_logits"], diffs["max_abs_diff_centerness"])
        if not logit_diff <= atol or not diffs["max_abs_diff_box_ltrb"] <= atol * max(1.0, side / 100):
            raise ExportError(f"ONNX raw outputs differ from PyTorch (logits by {logit_diff:.2g}, boxes by "
                              f"{diffs['max_abs_diff_box_ltrb']:.2g} px) on {n} validation images")
        if result["same_detections"] < MIN_SAME_DETECTIONS:
            raise ExportError(f"ONNX detections differ from PyTorch's on {sum(not s for s in same)} of {n} "
                              "validation images after decoding")
        return result


# Raw outputs within tolerance are the real check; after decoding, NMS between boxes whose scores
# tie to ~1e-6 (an untrained detector's flat scores) may keep a different one of them on either
# side, so a few images may differ there without any fault in the export.
MIN_SAME_DETECTIONS = 0.9


def _same_detections(ours: Any, theirs: Any, threshold: float, atol: float) -> bool:
    """The same detections in any order (same class, boxes within 0.5 px), ignoring scores within
    ``atol`` of the threshold (either side may keep or drop those)."""
    def solid(dets: Any) -> tuple[np.ndarray, np.ndarray]:
        keep = dets.scores >= threshold + atol
        return dets.boxes[keep], dets.labels[keep]

    (boxes_a, labels_a), (boxes_b, labels_b) = solid(ours), solid(theirs)
    if len(boxes_a) != len(boxes_b):
        return False
    if not len(boxes_a):
        return True
    order_a = np.lexsort((*np.round(boxes_a.T[::-1], 1), labels_a))
    order_b = np.lexsort((*np.round(boxes_b.T[::-1], 1), labels_b))
    return bool(np.array_equal(labels_a[order_a], labels_b[order_b])
                and float(np.abs(boxes_a[order_a] - boxes_b[order_b]).max()) <= 0.5)


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

    def export_module(self, model: nn.Module, info: dict[str, Any] | None = None) -> nn.Module:
        """The detector with the head of its run (``run.json``'s ``detection``), ready to export."""
        head = DetectionHead.from_dict(info["detection"]) if info and "detection" in info else None
        return DetectorExport(model, head)

    def evaluate(self, artifact: Any, data: str | None = None, **kwargs: Any) -> Any:
        from lensforge.evaluate.detection_runner import evaluate_detector

        kwargs["batch_size"] = min(int(kwargs.get("batch_size", 64)), 64)  # raw outputs hold A x C floats per image
        return evaluate_detector(artifact, data, **kwargs)

    def stress(self, artifact: Any, data: str | None = None, **kwargs: Any) -> Any:
        from lensforge.stress.detection import stress_detector

        return stress_detector(artifact, data, **kwargs)


TASK = DetectionTorch()
