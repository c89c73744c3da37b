from __future__ import annotations

import numpy as np
import pytest
import torch

from lensforge.tasks.detection import DetectionHead
from lensforge.tasks.detection import anchor_points as contract_points
from lensforge.train.detection.assign import anchor_points, assign_targets, pad_targets

HEAD = DetectionHead(levels=((8, 16, 16), (16, 8, 8), (32, 4, 4)))  # a 128-px input
LEVEL_STARTS = (0, 256, 320, 336)


def _assign(*images):
    """Assign hand-made (boxes, labels) per image."""
    targets = [(torch.tensor(b, dtype=torch.float32).reshape(-1, 4), torch.tensor(c, dtype=torch.int64))
               for b, c in images]
    return assign_targets(anchor_points(HEAD), *pad_targets(targets))


def _level(point_index: int) -> int:
    return int(np.searchsorted(LEVEL_STARTS, point_index, side="right")) - 1


def test_points_follow_the_contract():
    points = anchor_points(HEAD)
    assert np.array_equal(points.xy.numpy(), contract_points(HEAD))
    assert points.strides[:256].eq(8).all() and points.strides[-16:].eq(32).all()
    assert points.ranges[0].tolist() == [0, 32] and points.ranges[-1, 1] == float("inf")


def test_small_box_goes_to_the_fine_level_large_box_to_a_coarse_one():
    small, large = [44, 44, 68, 68], [4, 4, 124, 124]  # 24 px: reach <= 32; 120 px: reach > 64
    result = _assign(([small], [2]), ([large], [1]))
    small_pos = torch.nonzero(result.positive[0]).flatten().tolist()
    large_pos = torch.nonzero(result.positive[1]).flatten().tolist()
    assert small_pos and {_level(i) for i in small_pos} == {0}
    assert large_pos and {_level(i) for i in large_pos} == {2}
    assert result.labels[0, small_pos].eq(2).all() and result.labels[1, large_pos].eq(1).all()
    # centre sampling: positives lie within 1.5 strides of the box centre
    xy = anchor_points(HEAD).xy
    assert (xy[small_pos] - 56).abs().max() <= 1.5 * 8
    # the targets are the point's distances to the box sides
    for i in small_pos:
        x, y = xy[i].tolist()
        assert result.box_ltrb[0, i].tolist() == pytest.approx([x - 44, y - 44, 68 - x, 68 - y])


def test_centerness_target_is_one_at_the_centre_and_falls_off():
    result = _assign(([[44, 44, 76, 76]], [0]),)  # centre (60, 60) is a stride-8 point: 3 x 3 positives
    ctr, positive = result.centerness[0], result.positive[0]
    assert int(positive.sum()) == 9 and bool(((ctr > 0) == positive).all())
    assert float(ctr.max()) == pytest.approx(1.0)
    assert float(ctr[positive].min()) == pytest.approx(1 / 3)  # a corner point: sqrt(8/24 * 8/24)


def test_overlapping_boxes_the_smallest_wins():
    outer, inner = [8, 8, 56, 56], [30, 30, 50, 50]  # both on the stride-8 level; their centre regions overlap
    result = _assign(([outer, inner], [0, 1]),)
    labels, xy = result.labels[0], anchor_points(HEAD).xy
    assert labels[_at(xy, 36, 36)] == 1  # claimed by both: the smaller box
    assert [int(labels[_at(xy, x, y)]) for x, y in ((28, 28), (28, 36), (36, 28))] == [0, 0, 0]
    assert [int(labels[_at(xy, x, y)]) for x, y in ((36, 44), (44, 36), (44, 44))] == [1, 1, 1]
    assert int(result.positive[0].sum()) == 7


def _at(xy: torch.Tensor, x: float, y: float) -> int:
    """Index of the stride-8 point at (x, y)."""
    return int(torch.nonzero((xy[:256] == torch.tensor([x, y])).all(1))[0])


def test_images_without_boxes_and_padding_are_background():
    result = _assign(([], []), ([[8, 8, 40, 40]], [1]))
    assert not result.positive[0].any() and result.positive[1].any()
    assert result.centerness[0].eq(0).all()
