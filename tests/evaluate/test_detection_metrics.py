"""Detection metrics: COCO mAP through torchmetrics, the F1 threshold, PR curves, the confusion matrix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lensforge.evaluate.detection import (
    choose_score_threshold,
    confusion_matrix,
    detection_metrics,
    match_image,
    pr_curves,
    worst_images,
)
from lensforge.tasks.detection import BoxTarget, Detections

NAMES = ["cat", "dog", "bird"]


def targets_and_perfect_predictions(seed: int = 0, images: int = 6) -> tuple[list[BoxTarget], list[Detections]]:
    rng = np.random.default_rng(seed)
    targets, predictions = [], []
    for _ in range(images):
        count = int(rng.integers(1, 5))
        top_left = rng.uniform(0, 200, size=(count, 2))
        boxes = np.concatenate([top_left, top_left + rng.uniform(20, 120, size=(count, 2))], axis=1)
        labels = rng.integers(0, 2, size=count)  # "bird" never appears
        targets.append(BoxTarget(boxes, labels))
        predictions.append(Detections(boxes, rng.uniform(0.5, 1.0, size=count), labels))
    return targets, predictions


def shifted(predictions: list[Detections], fraction: float) -> list[Detections]:
    """Every box moved right by ``fraction`` of its width."""
    out = []
    for p in predictions:
        width = p.boxes[:, 2] - p.boxes[:, 0]
        out.append(Detections(p.boxes + np.stack([width, 0 * width, width, 0 * width], axis=1) * fraction,
                              p.scores, p.labels))
    return out


def test_perfect_predictions_score_one_and_absent_classes_are_none() -> None:
    targets, predictions = targets_and_perfect_predictions()
    metrics = detection_metrics(predictions, targets, NAMES)
    assert metrics["map"] == pytest.approx(1.0) and metrics["map50"] == pytest.approx(1.0)
    assert metrics["map75"] == pytest.approx(1.0) and metrics["mar100"] == pytest.approx(1.0)
    assert metrics["per_class_ap"]["cat"] == pytest.approx(1.0) and metrics["per_class_ap"]["dog"] == pytest.approx(1.0)
    assert metrics["per_class_ap"]["bird"] is None
    assert set(metrics) == {"map", "map50", "map75", "map_small", "map_medium", "map_large", "mar100", "per_class_ap"}
    assert json.loads(json.dumps(metrics)) == metrics


def test_a_class_only_predicted_is_none_too() -> None:
    targets, predictions = targets_and_perfect_predictions()
    predictions[0] = Detections(np.concatenate([predictions[0].boxes, [[0, 0, 5, 5]]]),
                                np.concatenate([predictions[0].scores, [0.9]]),
                                np.concatenate([predictions[0].labels, [2]]))
    metrics = detection_metrics(predictions, targets, NAMES)
    assert metrics["per_class_ap"]["bird"] is None and metrics["map"] == pytest.approx(1.0)


def test_shifted_boxes_lower_map_in_order() -> None:
    targets, predictions = targets_and_perfect_predictions()
    maps = [detection_metrics(shifted(predictions, fraction), targets, NAMES) for fraction in (0.0, 0.1, 0.25, 0.6)]
    values = [m["map"] for m in maps]
    assert values == sorted(values, reverse=True) and values[0] > values[1] > values[2] > values[3]
    # IoU of a box shifted by a quarter of its width is 0.6: found at 0.5, not at 0.75
    assert maps[2]["map50"] == pytest.approx(1.0) and maps[2]["map75"] == pytest.approx(0.0)
    assert maps[3]["map50"] == pytest.approx(0.0)


def test_no_images_and_no_detections() -> None:
    assert detection_metrics([], [], NAMES)["map"] is None
    targets, _ = targets_and_perfect_predictions(images=2)
    empty = [Detections(np.zeros((0, 4)), [], []) for _ in targets]
    metrics = detection_metrics(empty, targets, NAMES)
    assert metrics["map"] == 0.0 and metrics["per_class_ap"]["bird"] is None
    assert choose_score_threshold(empty, targets, fallback=0.25) == (0.25, 0.0, 0.0, 0.0)
    assert worst_images(empty, targets, 5, score_threshold=0.5)[0].error_count >= 1
    with pytest.raises(ValueError, match="predictions"):
        detection_metrics(empty, targets[:1], NAMES)


def test_matching_is_greedy_by_score_within_a_class() -> None:
    target = BoxTarget([[0, 0, 10, 10], [100, 100, 110, 110]], [0, 0])
    prediction = Detections([[1, 0, 11, 10], [0, 0, 10, 10], [100, 100, 110, 110], [0, 0, 10, 10]],
                            [0.9, 0.8, 0.7, 0.95], [0, 0, 0, 1])
    # the 0.9 detection takes box 0 first though the 0.8 one fits it better; the class-1 one matches nothing
    assert match_image(prediction, target).tolist() == [0, -1, 1, -1]


def test_threshold_choice_finds_the_best_f1() -> None:
    box = [[0, 0, 10, 10]]
    far = [[50, 50, 60, 60]]
    targets = [BoxTarget(box, [0]) for _ in range(4)]
    # scores: correct 0.9, 0.8, 0.4 ; false 0.85, 0.3 ; image 3 missed at any threshold
    predictions = [Detections(box + far, [0.9, 0.85], [0, 0]), Detections(box, [0.8], [0]),
                   Detections(box + far, [0.4, 0.3], [0, 0]), Detections(far, [0.2], [0])]
    # cut after 0.8: TP 2, kept 3 -> F1 = 4/7; after 0.4: TP 3, kept 4 -> F1 = 6/8 = 0.75 (best); after 0.3: 6/9
    threshold, precision, recall, f1 = choose_score_threshold(predictions, targets)
    assert threshold == pytest.approx(0.4) and f1 == pytest.approx(0.75)
    assert precision == pytest.approx(0.75) and recall == pytest.approx(0.75)
    shown = sum(int((p.scores >= threshold).sum()) for p in predictions)
    assert shown == 4  # the threshold keeps exactly the detections counted


def test_threshold_never_splits_equal_scores() -> None:
    box, far = [[0, 0, 10, 10]], [[50, 50, 60, 60]]
    targets = [BoxTarget(box, [0]), BoxTarget(box, [0])]
    # the 0.9 pair is one right and one wrong: keeping only the right one would give F1 1 if ties could split
    predictions = [Detections(box + far, [0.9, 0.9], [0, 0]), Detections(box, [0.5], [0])]
    threshold, precision, recall, f1 = choose_score_threshold(predictions, targets)
    assert threshold == pytest.approx(0.5) and precision == pytest.approx(2 / 3) and recall == 1.0


def test_pr_curves_have_monotone_recall() -> None:
    targets, predictions = targets_and_perfect_predictions(seed=1, images=10)
    rng = np.random.default_rng(2)
    noisy = [Detections(np.concatenate([p.boxes, p.boxes[:1] + 300]), rng.random(len(p) + 1),
                        np.concatenate([p.labels, [0]])) for p in predictions]
    curves = pr_curves(shifted(noisy, 0.2), targets, NAMES)
    assert set(curves) == {"cat", "dog"}  # no bird objects: no curve
    for recall, precision in curves.values():
        assert len(recall) == len(precision) > 0
        assert (np.diff(recall) >= 0).all() and recall[-1] == pytest.approx(1.0)
        assert ((precision >= 0) & (precision <= 1)).all()


def test_confusion_matrix_counts_a_hand_made_case() -> None:
    targets = [BoxTarget([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0, 1, 1])]
    predictions = [Detections([[0, 0, 10, 10],  # cat as cat
                               [20, 20, 30, 31],  # dog called cat
                               [70, 70, 80, 80],  # a bird where nothing is
                               [40, 40, 50, 50]],  # below the threshold: the dog at 40 is missed
                              [0.9, 0.8, 0.7, 0.1], [0, 0, 2, 1])]
    matrix = confusion_matrix(predictions, targets, 3, score_threshold=0.5)
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 0] = 1  # cat found
    expected[1, 0] = 1  # dog predicted as cat
    expected[1, 3] = 1  # dog missed
    expected[3, 2] = 1  # background predicted as bird
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.sum() == 4


def test_worst_images_sorts_errors() -> None:
    box, far = [[0, 0, 10, 10]], [[50, 50, 60, 60]]
    targets = [BoxTarget(box, [0]), BoxTarget(box + far, [0, 1]), BoxTarget(box, [0])]
    predictions = [Detections(box, [0.9], [0]), Detections(box + [[80, 80, 90, 90]], [0.9, 0.8], [0, 1]),
                   Detections(box, [0.9], [1])]
    worst = worst_images(predictions, targets, 5, score_threshold=0.5)
    assert [image.index for image in worst] == [1, 2]
    first = worst[0]
    assert first.error_count == 2 and len(first.tp_boxes) == 1 and len(first.fp_boxes) == 1
    np.testing.assert_array_equal(first.missed_boxes, far)
    assert worst[1].error_count == 2  # a wrong class is a false positive and a miss
    assert [image.index for image in worst_images(predictions, targets, 1, score_threshold=0.5)] == [1]


def coco_ap(recall: np.ndarray, precision: np.ndarray, nudge: float = 0.0) -> float:
    """COCO's 101-point interpolated AP of one PR curve, its recall points moved by ``nudge``."""
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.searchsorted(recall, np.linspace(0, 1, 101) + nudge, side="left")
    return float(np.where(points < len(recall), envelope[np.minimum(points, len(recall) - 1)], 0).mean())


@pytest.mark.parametrize("seed", range(8))
def test_our_matching_agrees_with_coco(seed: int) -> None:
    targets, predictions = targets_and_perfect_predictions(seed=seed, images=12)
    rng = np.random.default_rng(seed)
    noisy = []
    for p in predictions:
        boxes = np.concatenate([p.boxes + rng.normal(0, 8, p.boxes.shape), p.boxes[:1] + 150])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)  # COCO ignores inverted boxes; postprocess makes none
        noisy.append(Detections(boxes, rng.random(len(p) + 1), np.concatenate([p.labels, rng.integers(0, 2, 1)])))
    coco = detection_metrics(noisy, targets, NAMES, iou_thresholds=[0.5])["per_class_ap"]
    for name, (recall, precision) in pr_curves(noisy, targets, NAMES).items():
        # a recall of exactly k/n on a recall point (0.6 = 6/10) falls either side of it depending on
        # rounding (faster-coco-eval's differs from NumPy's): COCO's AP lies between the two readings
        low, high = sorted([coco_ap(recall, precision, 1e-9), coco_ap(recall, precision, -1e-9)])
        assert low - 1e-6 <= coco[name] <= high + 1e-6
