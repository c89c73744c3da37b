"""Detection metrics: COCO mAP through torchmetrics, and the matching behind thresholds and plots.

mAP comes from torchmetrics' :class:`MeanAveragePrecision` on the faster-coco-eval backend, so
the numbers are COCO's. Everything that needs a yes/no per detection (the score threshold with
the best F1, PR curves, the confusion matrix, the worst images) shares one greedy matcher
written in NumPy: detections in descending score order each take the unmatched ground-truth box
of their class with the highest IoU at or above the threshold, as COCO's evaluation does.
Boxes are xyxy in original-image pixels (what :func:`lensforge.tasks.detection.postprocess` gives).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision

from lensforge.tasks.detection import BoxTarget, Detections, box_iou

COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # mAP@[.5:.95]
MATCH_IOU = 0.5  # PASCAL VOC's criterion: the usual IoU for counting a detection as correct
# COCO's summary keys and ours; COCO answers -1 where a number has nothing to average (no objects of that size)
_COCO_KEYS = {"map": "map", "map50": "map_50", "map75": "map_75", "map_small": "map_small",
              "map_medium": "map_medium", "map_large": "map_large", "mar100": "mar_100"}


def detection_metrics(predictions: Sequence[Detections], targets: Sequence[BoxTarget], class_names: Sequence[str],
                      *, iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS) -> dict[str, Any]:
    """COCO box metrics of one split, as JSON-safe floats (None where COCO has no answer).

    Returns:
        ``map`` (mAP over ``iou_thresholds``, by default @[.5:.95]), ``map50``, ``map75``,
        ``map_small``, ``map_medium``, ``map_large``, ``mar100`` (recall with 100 detections per
        image) and ``per_class_ap`` {class name: AP, None for a class without objects in ``targets``}.
    """
    _check_lengths(predictions, targets)
    if not predictions:
        return {**dict.fromkeys(_COCO_KEYS), "per_class_ap": dict.fromkeys(map(str, class_names))}
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[float(t) for t in iou_thresholds],
                                  class_metrics=True, backend="faster_coco_eval")
    metric.warn_on_many_detections = False  # COCO keeps the best 100 per image, as it should
    metric.update([{"boxes": torch.from_numpy(p.boxes), "scores": torch.from_numpy(p.scores),
                    "labels": torch.from_numpy(p.labels)} for p in predictions],
                  [{"boxes": torch.from_numpy(t.boxes), "labels": torch.from_numpy(t.labels)} for t in targets])
    result = metric.compute()
    out: dict[str, Any] = {key: _coco_float(result[coco_key]) for key, coco_key in _COCO_KEYS.items()}
    per_class = dict(zip(result["classes"].reshape(-1).tolist(), result["map_per_class"].reshape(-1).tolist()))
    out["per_class_ap"] = {str(name): _coco_float(per_class.get(i)) for i, name in enumerate(class_names)}
    return out


def _coco_float(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) or number < 0 else number


def _check_lengths(predictions: Sequence[Detections], targets: Sequence[BoxTarget]) -> None:
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets: one of each per image")


# ---- matching ---------------------------------------------------------------------------------


def match_image(prediction: Detections, target: BoxTarget, iou: float = MATCH_IOU) -> np.ndarray:
    """For each detection, the index of the ground-truth box it matches, or -1 (a false positive).

    Greedy in descending score: a detection takes the still unmatched box of its own class with the
    highest IoU, if that IoU is at least ``iou``.
    """
    matched = np.full(len(prediction), -1, dtype=np.int64)
    if not len(prediction) or not len(target):
        return matched
    overlaps = box_iou(prediction.boxes, target.boxes)
    overlaps[prediction.labels[:, None] != target.labels[None, :]] = -1.0
    taken = np.zeros(len(target), dtype=bool)
    order = np.argsort(-prediction.scores, kind="stable")
    for detection in order[overlaps[order].max(axis=1) >= iou]:  # the others can match nothing
        row = np.where(taken, -1.0, overlaps[detection])
        best = int(row.argmax())
        if row[best] >= iou:
            matched[detection], taken[best] = best, True
    return matched


class _Matches(NamedTuple):
    scores: np.ndarray  # (D,) every detection of every image
    labels: np.ndarray  # (D,)
    true_positive: np.ndarray  # (D,) bool
    target_labels: np.ndarray  # (G,) every ground-truth box's class


def _match_all(predictions: Sequence[Detections], targets: Sequence[BoxTarget], iou: float) -> _Matches:
    _check_lengths(predictions, targets)
    matched = [match_image(p, t, iou) >= 0 for p, t in zip(predictions, targets)]
    scores = np.concatenate([p.scores for p in predictions] + [np.zeros(0, np.float32)])
    labels = np.concatenate([p.labels for p in predictions] + [np.zeros(0, np.int64)])
    target_labels = np.concatenate([t.labels for t in targets] + [np.zeros(0, np.int64)])
    return _Matches(scores, labels, np.concatenate(matched + [np.zeros(0, bool)]), target_labels)


def _ranked(scores: np.ndarray, true_positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores in descending order, with the cumulative true positives and detections at each rank."""
    order = np.argsort(-scores, kind="stable")
    return scores[order], np.cumsum(true_positive[order]), np.arange(1, len(order) + 1)


def choose_score_threshold(predictions: Sequence[Detections], targets: Sequence[BoxTarget], iou: float = MATCH_IOU,
                           *, fallback: float = 0.3) -> tuple[float, float, float, float]:
    """The score threshold with the highest F1 at ``iou``, and its precision, recall and F1.

    Greedy matching in score order never lets a lower-scoring detection change what a higher one
    matched, so matching every detection once and sorting them gives the counts at every
    threshold at once: keeping the detections scoring >= s is a prefix of the sorted list.

    Returns:
        (threshold, precision, recall, f1); ``(fallback, 0, 0, 0)`` when no detection is correct
        (F1 is then 0 at every threshold, e.g. an untrained model).
    """
    matches = _match_all(predictions, targets, iou)
    scores, true_positives, kept = _ranked(matches.scores, matches.true_positive)
    objects = len(matches.target_labels)
    if not len(scores) or not objects or true_positives[-1] == 0:
        return float(fallback), 0.0, 0.0, 0.0
    f1 = 2 * true_positives / (kept + objects)  # 2TP / (2TP + FP + FN)
    # a threshold keeps all detections of equal score or none: cut only after the last of a tie
    f1[:-1][scores[1:] == scores[:-1]] = -1.0
    best = int(f1.argmax())
    return (float(scores[best]), float(true_positives[best] / kept[best]), float(true_positives[best] / objects),
            float(f1[best]))


def pr_curves(predictions: Sequence[Detections], targets: Sequence[BoxTarget], class_names: Sequence[str],
              iou: float = MATCH_IOU) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class, (recall, precision) after each detection in descending score (not interpolated).

    Classes without ground-truth boxes are left out: their recall is undefined.
    """
    matches = _match_all(predictions, targets, iou)
    curves = {}
    for index, name in enumerate(class_names):
        objects = int((matches.target_labels == index).sum())
        if not objects:
            continue
        mine = matches.labels == index
        _, true_positives, kept = _ranked(matches.scores[mine], matches.true_positive[mine])
        curves[str(name)] = (true_positives / objects, true_positives / np.maximum(kept, 1))
    return curves


def confusion_matrix(predictions: Sequence[Detections], targets: Sequence[BoxTarget], num_classes: int, *,
                     score_threshold: float, iou: float = MATCH_IOU) -> np.ndarray:
    """(C + 1, C + 1) counts; rows are the true class, columns the predicted, index C is background.

    Detections at or above ``score_threshold`` are paired with ground-truth boxes by IoU alone
    (largest IoU first, each box and detection used once), so a box found with the wrong class
    lands off the diagonal instead of counting as one miss and one false alarm, as in
    Ultralytics' detection confusion matrix. An unpaired detection is (background, predicted),
    an unpaired box is (true, background).
    """
    _check_lengths(predictions, targets)
    background = num_classes
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for prediction, target in zip(predictions, targets):
        shown = prediction.above(score_threshold)
        pairs = _pairs_by_iou(box_iou(target.boxes, shown.boxes), iou)
        paired_truth = np.zeros(len(target), dtype=bool)
        paired_shown = np.zeros(len(shown), dtype=bool)
        for truth, detection in pairs:
            matrix[target.labels[truth], shown.labels[detection]] += 1
            paired_truth[truth] = paired_shown[detection] = True
        np.add.at(matrix, (target.labels[~paired_truth], background), 1)
        np.add.at(matrix, (background, shown.labels[~paired_shown]), 1)
    return matrix


def _pairs_by_iou(overlaps: np.ndarray, iou: float) -> list[tuple[int, int]]:
    rows, cols = np.nonzero(overlaps >= iou)
    order = np.argsort(-overlaps[rows, cols], kind="stable")
    used_rows, used_cols, pairs = set(), set(), []
    for row, col in zip(rows[order].tolist(), cols[order].tolist()):
        if row not in used_rows and col not in used_cols:
            used_rows.add(row)
            used_cols.add(col)
            pairs.append((row, col))
    return pairs


class ImageErrors(NamedTuple):
    """One image's detections sorted into right, wrong and missed, for a gallery (xyxy boxes)."""

    index: int
    tp_boxes: np.ndarray  # detections that matched a box of their class
    fp_boxes: np.ndarray  # detections that matched nothing (wrong place or wrong class)
    missed_boxes: np.ndarray  # ground-truth boxes no detection matched
    error_count: int  # false positives + missed


def worst_images(predictions: Sequence[Detections], targets: Sequence[BoxTarget], k: int, *,
                 score_threshold: float, iou: float = MATCH_IOU) -> list[ImageErrors]:
    """The ``k`` images with the most errors (false positives + misses) at ``score_threshold``.

    Images without errors are left out, so fewer than ``k`` may come back; ties go to the lower index.
    """
    _check_lengths(predictions, targets)
    images = []
    for index, (prediction, target) in enumerate(zip(predictions, targets)):
        shown = prediction.above(score_threshold)
        matched = match_image(shown, target, iou)
        missed = np.ones(len(target), dtype=bool)
        missed[matched[matched >= 0]] = False
        errors = int((matched < 0).sum() + missed.sum())
        if errors:
            images.append(ImageErrors(index, shown.boxes[matched >= 0], shown.boxes[matched < 0],
                                      target.boxes[missed], errors))
    images.sort(key=lambda image: (-image.error_count, image.index))
    return images[:k]
