"""Corruptions for detection data: the boxes move with the pixels.

Photometric corruptions (noise, blur, weather, ...) leave every object where it was. The
viewpoint ones (rotation, scale, translation, perspective) warp the image by a matrix per
image; here the same matrices, drawn from the same generator in the same order as
:func:`lensforge.ops.corruptions.corrupt` draws them, move each box's four corners, and the
box becomes the corners' bounding box (as torchvision's v2 transforms do for rotated boxes),
clipped to the image. A box that leaves the image, or keeps under
:data:`MIN_VISIBLE_SHARE` of its area inside it, is dropped: that object is no longer there
to find. The mirrored border the warps use can show mirrored copies of objects near the edge;
those carry no box, so detecting them counts against the detector, as any clutter would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lensforge.ops.corruptions._ops import stable_seed
from lensforge.ops.corruptions.geometry import MATRICES
from lensforge.ops.corruptions.registry import BLOCK_VALUES, CORRUPTIONS, corrupt

MIN_VISIBLE_SHARE = 0.25  # of a moved box's area inside the image, or the object is dropped


def moves_boxes(name: str) -> bool:
    """True for the corruptions that move image content (their boxes must move too)."""
    return name in MATRICES


def corrupt_with_boxes(images: torch.Tensor, boxes: Sequence[np.ndarray], name: str, severity: int, *,
                       seed: int = 0) -> tuple[torch.Tensor, list[np.ndarray], list[np.ndarray]]:
    """:func:`corrupt` the images, and move each image's (K, 4) xyxy pixel boxes with them.

    Returns ``(images, boxes, kept)``: ``kept[i]`` is the boolean mask of image i's boxes still
    in the picture (index the labels with it).
    """
    out = corrupt(images, name, severity, seed=seed)
    if not moves_boxes(name) or images.shape[0] == 0:
        return out, [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes], \
            [np.ones(len(b), dtype=bool) for b in boxes]
    matrices = _matrices(images, name, severity, seed)
    height, width = images.shape[-2:]
    moved, kept = [], []
    for image_boxes, matrix in zip(boxes, matrices):
        new, keep = _move(np.asarray(image_boxes, dtype=np.float64).reshape(-1, 4), matrix, width, height)
        moved.append(new)
        kept.append(keep)
    return out, moved, kept


def _matrices(images: torch.Tensor, name: str, severity: int, seed: int) -> np.ndarray:
    """The (N, 3, 3) matrices ``corrupt`` warped each image with: the same draws, block by block."""
    generator = torch.Generator(device=images.device)
    generator.manual_seed(stable_seed(seed, name, severity))
    CORRUPTIONS.get(name)  # unknown names fail as corrupt() fails
    block = max(1, BLOCK_VALUES // images[0].numel())
    parts = [MATRICES[name](images[first:first + block].float(), severity, generator)
             for first in range(0, images.shape[0], block)]
    return torch.cat(parts).double().cpu().numpy()


def _move(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (edge coordinates) through the inverse of an output -> input matrix (pixel-centre coordinates)."""
    if not len(boxes):
        return boxes.astype(np.float32), np.zeros(0, dtype=bool)
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    x1, y1, x2, y2 = boxes.T
    corners = np.stack([np.stack([x1, y1], -1), np.stack([x2, y1], -1), np.stack([x2, y2], -1),
                        np.stack([x1, y2], -1)], 1) - 0.5 - centre  # (K, 4, 2), centred pixel-centre coords
    homogeneous = np.concatenate([corners, np.ones(corners.shape[:2] + (1,))], -1)
    mapped = homogeneous @ np.linalg.inv(matrix).T
    points = mapped[..., :2] / np.clip(mapped[..., 2:], 1e-6, None) + centre + 0.5
    moved = np.concatenate([points.min(1), points.max(1)], 1)
    area = np.prod(np.clip(moved[:, 2:] - moved[:, :2], 0, None), 1)
    clipped = np.clip(moved, 0, [width, height, width, height])
    inside = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), 1)
    keep = (inside >= MIN_VISIBLE_SHARE * np.maximum(area, 1e-9)) & (inside > 1.0)
    return clipped[keep].astype(np.float32), keep
