"""The torch-free detection runtime: decode, NMS and postprocess agree with torch references."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from lensforge.data.preprocess import letterbox_scale
from lensforge.tasks.detection import (
    RAW_OUTPUTS,
    DetectionHead,
    Detections,
    anchor_points,
    batched_nms,
    decode,
    detection_row,
    nms,
    postprocess,
)

HEAD = DetectionHead(levels=((8, 4, 6), (16, 2, 3)))  # an input of 32 x 48 (height x width)


def random_boxes(rng: np.random.Generator, count: int, extent: float = 100.0) -> np.ndarray:
    top_left = rng.uniform(-10, extent, size=(count, 2))
    return np.concatenate([top_left, top_left + rng.uniform(1, extent / 3, size=(count, 2))], axis=1).astype(np.float32)


def random_raw(rng: np.random.Generator, batch: int, head: DetectionHead, classes: int) -> dict[str, np.ndarray]:
    points = head.num_points
    return {"cls_logits": rng.normal(0, 3, size=(batch, points, classes)).astype(np.float32),
            "box_ltrb": rng.uniform(0, 20, size=(batch, points, 4)).astype(np.float32),
            "centerness": rng.normal(0, 2, size=(batch, points)).astype(np.float32),
            "features": np.zeros((batch, 5), np.float32)}


@pytest.mark.parametrize("seed", range(20))
def test_batched_nms_matches_torchvision(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 300))
    boxes, scores = random_boxes(rng, count), rng.permutation(count).astype(np.float32) / count  # no ties
    labels = rng.integers(0, 4, size=count)
    iou = float(rng.uniform(0.2, 0.8))
    expected = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                           torch.from_numpy(labels), iou).numpy()
    np.testing.assert_array_equal(batched_nms(boxes, scores, labels, iou), expected)
    expected_plain = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
    np.testing.assert_array_equal(nms(boxes, scores, iou), expected_plain)


def test_nms_of_nothing_keeps_nothing() -> None:
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), 0.5).shape == (0,)


def torch_decode(raw: dict[str, np.ndarray], head: DetectionHead) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract, written out the obvious way."""
    points = []
    for stride, height, width in head.levels:
        for i in range(height):
            for j in range(width):
                points.append(((j + 0.5) * stride, (i + 0.5) * stride))
    xy = torch.tensor(points, dtype=torch.float32)
    ltrb = torch.from_numpy(raw["box_ltrb"])
    boxes = torch.stack([xy[:, 0] - ltrb[..., 0], xy[:, 1] - ltrb[..., 1],
                         xy[:, 0] + ltrb[..., 2], xy[:, 1] + ltrb[..., 3]], dim=-1)
    scores = torch.sqrt(torch.sigmoid(torch.from_numpy(raw["cls_logits"]))
                        * torch.sigmoid(torch.from_numpy(raw["centerness"]))[..., None])
    return boxes, scores


def test_decode_matches_a_torch_reference() -> None:
    raw = random_raw(np.random.default_rng(0), 3, HEAD, 5)
    expected_boxes, expected_scores = torch_decode(raw, HEAD)
    for given in (raw, [raw[name] for name in RAW_OUTPUTS]):
        boxes, scores = decode(given, HEAD)
        assert boxes.dtype == scores.dtype == np.float32
        np.testing.assert_allclose(boxes, expected_boxes.numpy(), atol=1e-4)
        np.testing.assert_allclose(scores, expected_scores.numpy(), rtol=1e-5, atol=1e-7)


def test_decode_survives_extreme_logits_and_rejects_wrong_shapes() -> None:
    raw = random_raw(np.random.default_rng(1), 1, HEAD, 2)
    raw["cls_logits"][0, 0] = [-1e4, 1e4]
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is the right answer
        _, scores = decode(raw, HEAD)
    assert np.isfinite(scores).all() and scores[0, 0, 0] == 0 and 0 < scores[0, 0, 1] <= 1
    with pytest.raises(ValueError, match="anchor points"):
        decode(random_raw(np.random.default_rng(1), 1, DetectionHead(levels=((8, 2, 2),)), 2), HEAD)
    with pytest.raises(ValueError, match="lack centerness"):
        decode({"cls_logits": raw["cls_logits"], "box_ltrb": raw["box_ltrb"]}, HEAD)


def test_anchor_points_follow_the_contract_and_are_cached() -> None:
    points = anchor_points(HEAD)
    assert points.shape == (HEAD.num_points, 2) and points.dtype == np.float32
    np.testing.assert_array_equal(points[:2], [[4, 4], [12, 4]])  # level 0, row 0, columns 0 and 1
    np.testing.assert_array_equal(points[6], [4, 12])  # level 0, row 1
    np.testing.assert_array_equal(points[24], [8, 8])  # first point of level 1 (stride 16)
    assert anchor_points(DetectionHead(levels=HEAD.levels, score_threshold=0.9)) is points
    assert not points.flags.writeable


def one_object_raw(head: DetectionHead, classes: int, anchor: int, label: int, ltrb: list[float]) -> dict:
    """Raw outputs where only ``anchor`` sees an object of class ``label``."""
    raw = {"cls_logits": np.full((1, head.num_points, classes), -10.0, np.float32),
           "box_ltrb": np.ones((1, head.num_points, 4), np.float32),
           "centerness": np.zeros((1, head.num_points), np.float32)}
    raw["cls_logits"][0, anchor, label] = 10.0
    raw["centerness"][0, anchor] = 10.0
    raw["box_ltrb"][0, anchor] = ltrb
    return raw


def test_postprocess_maps_boxes_back_through_the_letterbox() -> None:
    # a 96 x 40 (w x h) image fits a 32 x 48 input at scale 0.5 and fills 48 x 20 of it
    size = (96, 40)
    scale = letterbox_scale(size, (32, 48))
    assert scale == 0.5
    anchor = 6 * 1 + 2  # level 0, row 1, column 2: point (20, 12)
    raw = one_object_raw(HEAD, 3, anchor, label=2, ltrb=[10, 4, 6, 20])  # box (10, 8)-(26, 32) in the input
    (dets,) = postprocess(raw, HEAD, scales=[scale], sizes=[size])
    assert len(dets) == 1 and dets.labels.tolist() == [2]
    # the bottom edge (32 px) reaches into the padding: clipped to the image's 20 px, i.e. 40 original px
    np.testing.assert_allclose(dets.boxes, [[20, 16, 52, 40]])
    assert dets.boxes.dtype == np.float32 and dets.labels.dtype == np.int64
    assert dets.scores[0] == pytest.approx(1 / (1 + np.exp(-10)), rel=1e-6)


def test_postprocess_applies_threshold_nms_and_max_detections() -> None:
    rng = np.random.default_rng(3)
    raw = random_raw(rng, 2, HEAD, 4)
    head = DetectionHead(levels=HEAD.levels, score_threshold=0.2, nms_iou=0.5, max_detections=7, pre_nms_top_k=50)
    results = postprocess(raw, head, scales=[1.0, 0.5], sizes=[(48, 32), (96, 64)])
    assert len(results) == 2
    for dets, (width, height) in zip(results, [(48, 32), (96, 64)]):
        assert 0 < len(dets) <= 7
        assert (np.diff(dets.scores) <= 0).all() and (dets.scores >= 0.2).all()
        assert (dets.boxes >= 0).all() and (dets.boxes[:, [0, 2]] <= width).all()
        assert (dets.boxes[:, [1, 3]] <= height).all()
        for label in np.unique(dets.labels):  # class-wise NMS left no overlapping pair within a class
            same = dets.boxes[dets.labels == label]
            iou = torchvision.ops.box_iou(torch.from_numpy(same), torch.from_numpy(same)).numpy()
            assert (iou[~np.eye(len(same), dtype=bool)] <= 0.5 + 1e-6).all()
    lower = postprocess(raw, head, scales=[1.0, 0.5], sizes=[(48, 32), (96, 64)], score_threshold=0.9)
    assert all((dets.scores >= 0.9).all() for dets in lower)


def test_postprocess_with_nothing_above_threshold_gives_empty_detections() -> None:
    raw = one_object_raw(HEAD, 2, 0, 0, [1, 1, 1, 1])
    raw["cls_logits"][:] = -10
    (dets,) = postprocess(raw, HEAD, scales=[1.0], sizes=[(48, 32)])
    assert len(dets) == 0 and dets.boxes.shape == (0, 4)
    assert detection_row(dets, ["a", "b"]) == {"detections": [], "count": 0}
    empty_batch = {name: array[:0] for name, array in raw.items()}
    assert postprocess(empty_batch, HEAD, scales=[], sizes=[]) == []
    with pytest.raises(ValueError, match="scales"):
        postprocess(raw, HEAD, scales=[1.0, 1.0], sizes=[(48, 32)])


def test_detection_row_is_json_and_rounded() -> None:
    dets = Detections(boxes=[[1.23456, 2.0, 30.06, 40.5]], scores=[0.876543], labels=[1])
    row = detection_row(dets, ["cat", "dog"])
    assert row == {"detections": [{"label": "dog", "class_index": 1, "score": 0.8765,
                                   "box": [1.2, 2.0, 30.1, 40.5]}], "count": 1}
    assert json.loads(json.dumps(row)) == row
    assert detection_row(Detections([[0, 0, 1, 1]], [0.5], [7]), ["cat"])["detections"][0]["label"] == "7"


def test_importing_the_runtime_does_not_import_torch() -> None:
    code = ("import sys, lensforge.tasks.detection as d; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
