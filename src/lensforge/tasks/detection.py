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
from functools import lru_cache
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

    def describe_metric(self, value: float, split: str) -> str:
        return f"{split} mAP@[.5:.95] {value:.3f}"

    def describe_evaluation(self, metrics: dict[str, Any]) -> list[str] | None:
        def number(key: str) -> str:
            value = metrics.get(key)
            return "n/a" if value is None else f"{value:.3f}"

        return [f"{metrics.get('images')} images, {metrics.get('objects')} objects: mAP@[.5:.95] {number('map')}  "
                f"mAP50 {number('map50')}  mAP75 {number('map75')}  AR@100 {number('mar100')}",
                f"at score >= {metrics.get('score_threshold', 0):.3g}: precision {metrics.get('precision', 0):.1%}  "
                f"recall {metrics.get('recall', 0):.1%}  F1 {metrics.get('f1', 0):.3f}"]

    def stratify_key(self, target: Any) -> int:
        """The image's least frequent class would be best; its smallest class id is stable and close (-1: none)."""
        return int(target.labels.min()) if len(target) else -1

    def to_input_target(self, target: Any, original_size: tuple[int, int], pre: Any) -> Any:
        from lensforge.data.preprocess import letterbox_scale

        return target.scaled(letterbox_scale(original_size, pre.input_size))

    def predict_batch(self, bundle: Any, pixels: np.ndarray, sizes: Sequence[tuple[int, int]], *,
                      guardrails: Any = None, top_k: int = 5) -> list[dict[str, Any]]:
        """Boxes in original pixels above the bundle's score threshold (``top_k`` is a classifier's option)."""
        from lensforge.data.preprocess import letterbox_scale

        outputs = bundle.outputs_uint8(pixels)
        head = DetectionHead.from_dict(bundle.manifest["detection"])
        scales = [letterbox_scale(tuple(size), bundle.preprocess.input_size) for size in sizes]
        found = postprocess(outputs, head, scales=scales, sizes=[tuple(s) for s in sizes])
        rows = [detection_row(dets, bundle.class_names) for dets in found]
        if guardrails is not None:
            logits = image_logits(outputs["cls_logits"])
            for row, check in zip(rows, guardrails.check(logits, outputs["features"], pixels, list(sizes))):
                row.update(check)
        return rows


DETECTION = register_task(Detection())


# ---------------------------------------------------------------------------------------------
# Runtime: raw outputs -> boxes in original pixels, with NumPy only (predict, the server, eval).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Detections:
    """The detections of one image, sorted by score (highest first).

    Attributes:
        boxes: (N, 4) float32 ``x1, y1, x2, y2`` in pixels of the original image.
        scores: (N,) float32 in [0, 1].
        labels: (N,) int64 class indices.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "boxes", np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4))
        object.__setattr__(self, "scores", np.asarray(self.scores, dtype=np.float32).reshape(-1))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64).reshape(-1))
        if not len(self.boxes) == len(self.scores) == len(self.labels):
            raise ValueError(f"{len(self.boxes)} boxes, {len(self.scores)} scores and {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def above(self, score_threshold: float) -> Detections:
        """The detections scoring at or above ``score_threshold``."""
        keep = self.scores >= score_threshold
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])


def anchor_points(head: DetectionHead) -> np.ndarray:
    """(A, 2) float32 ``x, y`` input-pixel centres of the anchor points, in raw-output order (read-only)."""
    return _anchor_points(head.levels)


@lru_cache(maxsize=16)
def _anchor_points(levels: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    per_level = []
    for stride, height, width in levels:
        ys, xs = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
        per_level.append(np.stack([xs.ravel(), ys.ravel()], axis=1) * np.float32(stride) + np.float32(stride / 2))
    points = np.concatenate(per_level) if per_level else np.zeros((0, 2), np.float32)
    points.setflags(write=False)  # cached and shared: nobody may change it in place
    return points


RawOutputs = dict[str, np.ndarray] | Sequence[np.ndarray]


def decode(raw: RawOutputs, head: DetectionHead) -> tuple[np.ndarray, np.ndarray]:
    """Raw outputs to boxes and scores of every anchor point, in input pixels.

    ``raw`` is a mapping with the :data:`RAW_OUTPUTS` names (more keys, e.g. ``features``, are
    ignored) or a sequence holding them first, in that order (an ONNX session's outputs).

    The score of class c is FCOS's test-time score ``sqrt(sigmoid(cls_c) * sigmoid(centerness))``
    (Tian et al. 2019): centre-ness down-weights boxes predicted far from an object's centre, and
    the square root keeps the product on the scale of a probability, so one threshold fits both.

    Returns:
        boxes (B, A, 4) float32 xyxy input pixels, and scores (B, A, C) float32 in [0, 1].
    """
    cls_logits, box_ltrb, centerness = _raw_arrays(raw)
    points = anchor_points(head)
    if cls_logits.ndim != 3 or box_ltrb.shape != (*cls_logits.shape[:2], 4) \
            or centerness.shape != cls_logits.shape[:2]:
        raise ValueError(f"raw output shapes do not fit: cls_logits {cls_logits.shape}, box_ltrb {box_ltrb.shape}, "
                         f"centerness {centerness.shape} (want (B, A, C), (B, A, 4), (B, A))")
    if cls_logits.shape[1] != len(points):
        raise ValueError(f"the model gives {cls_logits.shape[1]} anchor points but the detection head's levels "
                         f"{[list(level) for level in head.levels]} make {len(points)}")
    boxes = np.concatenate([points - box_ltrb[..., :2], points + box_ltrb[..., 2:]], axis=-1)
    # sqrt(sigmoid(a) * sigmoid(b)) = exp(-(softplus(-a) + softplus(-b)) / 2): no overflow for any logit
    scores = np.exp(-0.5 * (np.logaddexp(0, -cls_logits) + np.logaddexp(0, -centerness)[..., None]))
    return boxes.astype(np.float32, copy=False), scores.astype(np.float32, copy=False)


def _raw_arrays(raw: RawOutputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(raw, dict):
        missing = [name for name in RAW_OUTPUTS if name not in raw]
        if missing:
            raise ValueError(f"raw outputs lack {', '.join(missing)} (have {', '.join(map(str, raw)) or 'none'})")
        arrays = [raw[name] for name in RAW_OUTPUTS]
    else:
        arrays = list(raw)[:len(RAW_OUTPUTS)]
        if len(arrays) < len(RAW_OUTPUTS):
            raise ValueError(f"raw outputs need {len(RAW_OUTPUTS)} arrays ({', '.join(RAW_OUTPUTS)}), "
                             f"got {len(arrays)}")
    cls_logits, box_ltrb, centerness = (np.asarray(a, dtype=np.float32) for a in arrays)
    return cls_logits, box_ltrb, centerness


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """(N, M) IoU of xyxy boxes, 0 where both are empty (as ``torchvision.ops.box_iou`` but finite)."""
    boxes1 = np.asarray(boxes1, dtype=np.float64).reshape(-1, 4)
    boxes2 = np.asarray(boxes2, dtype=np.float64).reshape(-1, 4)
    # column by column: reducing a (N, M, 2) array over its last axis is several times slower
    width = np.minimum(boxes1[:, None, 2], boxes2[None, :, 2]) - np.maximum(boxes1[:, None, 0], boxes2[None, :, 0])
    height = np.minimum(boxes1[:, None, 3], boxes2[None, :, 3]) - np.maximum(boxes1[:, None, 1], boxes2[None, :, 1])
    inter = np.maximum(width, 0) * np.maximum(height, 0)
    union = _area(boxes1)[:, None] + _area(boxes2)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; int64 indices of the boxes kept, highest score first.

    A box is dropped when its IoU with a higher-scoring kept box is above ``iou`` (strictly, as
    ``torchvision.ops.nms``).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64).reshape(-1), kind="stable")
    if len(order) > NMS_MATRIX_MAX:
        return _nms_row_by_row(boxes, order, iou)
    # one IoU matrix, then a walk down the rows of the boxes that overlap anything: with class
    # offsets most boxes overlap nothing, so the Python loop is short
    overlaps = np.triu(box_iou(boxes[order], boxes[order]) > iou, k=1)
    suppressed = np.zeros(len(order), dtype=bool)
    for row in np.flatnonzero(overlaps.any(axis=1)):
        if not suppressed[row]:
            suppressed |= overlaps[row]
    return order[~suppressed].astype(np.int64)


NMS_MATRIX_MAX = 2048  # candidates; above, one IoU row per kept box instead of an (N, N) matrix (32 MiB here)


def _nms_row_by_row(boxes: np.ndarray, order: np.ndarray, iou: float) -> np.ndarray:
    keep = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        if order.size:
            order = order[box_iou(boxes[best], boxes[order])[0] <= iou]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float) -> np.ndarray:
    """Class-wise :func:`nms`: boxes of different labels never suppress each other.

    Moves each class's boxes to their own region of the plane (torchvision's offset trick), so one
    NMS pass serves every class. The offset is the span of all coordinates plus one, computed in
    float64 so that the shifted boxes keep sub-pixel precision.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if boxes.size == 0:
        return np.zeros(0, dtype=np.int64)
    span = boxes.max() - boxes.min() + 1.0
    offsets = np.asarray(labels, dtype=np.float64).reshape(-1, 1) * span
    return nms(boxes + offsets, scores, iou)


def postprocess(raw: RawOutputs, head: DetectionHead, *, scales: Sequence[float], sizes: Sequence[tuple[int, int]],
                score_threshold: float | None = None) -> list[Detections]:
    """Raw outputs of a batch of letterboxed images to the detections of each, in original pixels.

    Per image: the (anchor, class) pairs scoring at or above the threshold, at most
    ``head.pre_nms_top_k`` of the best, boxes clipped to the image's part of the input (not its
    padding), class-wise NMS at ``head.nms_iou``, the best ``head.max_detections``, mapped back
    by the letterbox factor.

    Args:
        raw: the model's raw outputs (see :func:`decode`).
        head: levels and thresholds.
        scales: each image's letterbox factor (:func:`lensforge.data.preprocess.letterbox_scale`).
        sizes: each image's original (width, height).
        score_threshold: defaults to ``head.score_threshold``; evaluation passes
            ``head.eval_score_floor`` so that mAP ranks the low scores too.
    """
    boxes, scores = decode(raw, head)
    if not len(scales) == len(sizes) == len(boxes):
        raise ValueError(f"{len(boxes)} images in the raw outputs but {len(scales)} scales and {len(sizes)} sizes")
    threshold = head.score_threshold if score_threshold is None else float(score_threshold)
    return [_image_detections(boxes[i], scores[i], head, float(scales[i]), sizes[i], threshold)
            for i in range(len(boxes))]


def _image_detections(boxes: np.ndarray, scores: np.ndarray, head: DetectionHead, scale: float,
                      size: tuple[int, int], threshold: float) -> Detections:
    num_classes = scores.shape[1]
    flat = scores.reshape(-1)
    candidates = np.flatnonzero(flat >= threshold)
    if len(candidates) > head.pre_nms_top_k:
        candidates = candidates[np.argpartition(-flat[candidates], head.pre_nms_top_k - 1)[:head.pre_nms_top_k]]
    anchors, labels = np.divmod(candidates, num_classes)
    width, height = size
    # clip to the image inside the letterbox, so no box reaches into the padding
    limits = np.array([width, height, width, height], dtype=np.float32) * np.float32(scale)
    candidate_boxes = np.clip(boxes[anchors], 0, limits)
    solid = (candidate_boxes[:, 2] > candidate_boxes[:, 0]) & (candidate_boxes[:, 3] > candidate_boxes[:, 1])
    candidate_boxes, candidate_scores, labels = candidate_boxes[solid], flat[candidates][solid], labels[solid]
    keep = batched_nms(candidate_boxes, candidate_scores, labels, head.nms_iou)[:head.max_detections]
    original = np.clip(candidate_boxes[keep] / np.float32(scale), 0,
                       np.array([width, height, width, height], dtype=np.float32))
    return Detections(original, candidate_scores[keep], labels[keep])


def detection_row(dets: Detections, class_names: Sequence[str]) -> dict[str, Any]:
    """The JSON row of one image's detections, as ``predict`` writes and the server answers.

    Boxes are rounded to 0.1 px and scores to 4 digits; a label without a name is its index.
    """
    rows = []
    for box, score, label in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist()):
        name = str(class_names[label]) if 0 <= label < len(class_names) else str(label)
        rows.append({"label": name, "class_index": int(label), "score": round(float(score), 4),
                     "box": [round(float(v), 1) for v in box]})
    return {"detections": rows, "count": len(rows)}


def image_logits(cls_logits: np.ndarray) -> np.ndarray:
    """(B, A, C) anchor logits -> (B, C): each class's strongest evidence anywhere in the image.

    What the guardrails' logit-based OOD scores and confidence read for a detector: an image
    whose best anchor for every class is weak holds nothing the detector knows.
    """
    return np.asarray(cls_logits, dtype=np.float32).max(axis=1)
