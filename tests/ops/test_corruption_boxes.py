"""Viewpoint corruptions move a detector's boxes with the pixels; the others leave them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensforge.ops.corruptions import corrupt
from lensforge.ops.corruptions.boxes import corrupt_with_boxes, moves_boxes
from lensforge.ops.corruptions.geometry import MATRICES


def _scene(n: int = 6, size: int = 96) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Black images with one white square each, at a different place per image."""
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    boxes = []
    for i in range(n):
        x, y = 30 + 3 * i, 28 + 2 * i
        images[i, :, y:y + 20, x:x + 24] = 255
        boxes.append(np.array([[x, y, x + 24, y + 20]], dtype=np.float32))
    return images, boxes


@pytest.mark.parametrize("name", sorted(MATRICES))
@pytest.mark.parametrize("severity", [1, 3])
def test_moved_boxes_cover_the_moved_object(name, severity):
    images, boxes = _scene()
    out, moved, kept = corrupt_with_boxes(images, boxes, name, severity, seed=3)
    assert torch.equal(out, corrupt(images, name, severity, seed=3))  # the same pixels as the plain corruption
    for image, box, keep in zip(out, moved, kept):
        assert keep.all() and len(box) == 1
        bright = (image[0].numpy() > 127)
        ys, xs = np.nonzero(bright)
        x1, y1, x2, y2 = box[0]
        # the object's pixels lie inside its moved box (1 px slack for interpolation)
        assert xs.min() >= x1 - 1.5 and xs.max() + 1 <= x2 + 1.5 and ys.min() >= y1 - 1.5 and ys.max() + 1 <= y2 + 1.5
        # and the box is tight: a rotated square's box grows, but not beyond its corners' reach
        area_pixels = bright.sum()
        assert area_pixels <= (x2 - x1 + 2) * (y2 - y1 + 2) <= 2.2 * area_pixels


def test_photometric_corruptions_leave_the_boxes():
    images, boxes = _scene(3)
    assert not moves_boxes("gaussian_noise")
    _, moved, kept = corrupt_with_boxes(images, boxes, "gaussian_noise", 2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(moved, boxes)) and all(k.all() for k in kept)


def test_a_box_pushed_out_of_the_image_is_dropped():
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    boxes = [np.array([[0, 0, 6, 6], [20, 20, 44, 44]], dtype=np.float32)]
    hits = 0
    for seed in range(20):  # translation by 20% of 64 px in a random direction: the corner box often leaves
        _, moved, kept = corrupt_with_boxes(images, boxes, "translation", 5, seed=seed)
        assert kept[0][1] and len(moved[0]) == kept[0].sum()
        hits += not kept[0][0]
    assert hits > 0
