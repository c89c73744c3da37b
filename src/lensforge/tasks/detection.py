"""Object detection: labelled boxes per image (torch-free half).

A target is a :class:`BoxTarget`: ``boxes`` (K, 4) float32 ``x1, y1, x2, y2`` in pixels of
the image it belongs to, and ``labels`` (K,) int64 class indices; K = 0 is a negative
image (kept: it teaches the model what background looks like). Images reach the model
letterboxed (:func:`lensforge.data.preprocess.letterbox_scale`): scaled by one factor to
fit the input, padded at the right and bottom, so a box maps to the input by that factor
alone and back again the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lensforge.tasks import Task, register_task


@dataclass(frozen=True, eq=False)
class BoxTarget:
    """The objects of one image: (K, 4) float32 xyxy pixel boxes and (K,) int64 labels."""

    boxes: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "boxes", np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64).reshape(-1))
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def scaled(self, factor: float) -> BoxTarget:
        return BoxTarget(self.boxes * np.float32(factor), self.labels)


# The raw outputs of a detection model, in this order, in its ONNX graph and its torch forward (eval mode):
#   cls_logits (B, A, C) float: per-class logits of each anchor point
#   box_ltrb   (B, A, 4) float: distances in input pixels (>= 0) from the point to the box's left, top, right, bottom
#   centerness (B, A)    float: centre-ness logit of each point (FCOS), multiplied into the score
#   features   (B, F)    float: pooled backbone features, for the OOD guardrails
# Anchor points: level by level in the order of ``DetectionHead.levels``, row-major inside a level,
# point (x, y) = ((j + 0.5) * stride, (i + 0.5) * stride) for row i, column j.
RAW_OUTPUTS = ("cls_logits", "box_ltrb", "centerness")


@dataclass(frozen=True)
class DetectionHead:
    """What turns raw outputs into boxes; stored in the bundle manifest under ``detection``.

    Attributes:
        levels: (stride, height, width) of each feature level, in anchor order.
        score_threshold: detections at or above this score are shown (chosen on val for max F1).
        nms_iou: class-wise non-maximum suppression IoU.
        max_detections: per image, after NMS.
        pre_nms_top_k: candidates per image entering NMS.
        eval_score_floor: the lower threshold used when measuring mAP (which ranks every detection).
    """

    levels: tuple[tuple[int, int, int], ...]
    score_threshold: float = 0.3
    nms_iou: float = 0.6
    max_detections: int = 100
    pre_nms_top_k: int = 1000
    eval_score_floor: float = 0.05
    box_format: str = "xyxy"

    def to_dict(self) -> dict[str, Any]:
        return {"levels": [list(level) for level in self.levels], "score_threshold": self.score_threshold,
                "nms_iou": self.nms_iou, "max_detections": self.max_detections,
                "pre_nms_top_k": self.pre_nms_top_k, "eval_score_floor": self.eval_score_floor,
                "box_format": self.box_format}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectionHead:
        return cls(levels=tuple(tuple(int(v) for v in level) for level in d["levels"]),
                   score_threshold=float(d.get("score_threshold", 0.3)), nms_iou=float(d.get("nms_iou", 0.6)),
                   max_detections=int(d.get("max_detections", 100)),
                   pre_nms_top_k=int(d.get("pre_nms_top_k", 1000)),
                   eval_score_floor=float(d.get("eval_score_floor", 0.05)),
                   box_format=str(d.get("box_format", "xyxy")))

    @property
    def num_points(self) -> int:
        return sum(h * w for _, h, w in self.levels)


class Detection(Task):
    name = "detection"
    target_kind = "boxes"
    primary_metric = "map"  # COCO mAP@[.5:.95]
    torch_module = "lensforge.tasks.torch_detection"

    def collate(self, targets: Sequence[Any]) -> np.ndarray:
        out = np.empty(len(targets), dtype=object)  # ragged: one BoxTarget per image
        for i, target in enumerate(targets):
            out[i] = target
        return out

    def stratify_key(self, target: Any) -> int:
        """The image's least frequent class would be best; its smallest class id is stable and close (-1: none)."""
        return int(target.labels.min()) if len(target) else -1

    def to_input_target(self, target: Any, original_size: tuple[int, int], pre: Any) -> Any:
        from lensforge.data.preprocess import letterbox_scale

        return target.scaled(letterbox_scale(original_size, pre.input_size))


DETECTION = register_task(Detection())
