"""FCOS target assignment: which anchor point learns which box, vectorised over a batch.

A point is a positive of a box when it lies in the box's centre region (1.5 strides around
the box centre, clipped to the box: FCOS's centre sampling), and the largest of its four
distances to the box's sides falls in its level's range (small boxes on fine levels, large
on coarse ones). A point that several boxes claim learns the smallest one. Points are laid
out as the raw-output contract says (:mod:`lensforge.tasks.detection`): level by level,
row-major, at ((j + 0.5) * stride, (i + 0.5) * stride).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lensforge.tasks.detection import DetectionHead

CENTER_RADIUS = 1.5  # strides around a box centre whose points may be positives (FCOS TPAMI, Sec. 3.3)
# A level of stride s takes boxes whose largest point-to-side distance is in (8 * previous s, 8 * s]:
# FCOS's ranges (0, 64], (64, 128], ... for strides 8, 16, ...; the last level takes everything larger.
RANGE_PER_STRIDE = 4


@dataclass(frozen=True)
class AnchorPoints:
    """Every anchor point of a head: (A, 2) xy centres, (A,) strides, (A, 2) regression ranges (px)."""

    xy: torch.Tensor
    strides: torch.Tensor
    ranges: torch.Tensor

    def __len__(self) -> int:
        return len(self.strides)


def anchor_points(head: DetectionHead, device: torch.device | str = "cpu") -> AnchorPoints:
    """The points of ``head``'s levels in contract order, with each level's stride and distance range."""
    xy, strides, ranges = [], [], []
    low = 0.0
    for n, (stride, height, width) in enumerate(head.levels):
        high = math.inf if n == len(head.levels) - 1 else float(RANGE_PER_STRIDE * stride)
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
        xy.append(torch.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], 1))
        strides.append(torch.full((height * width,), float(stride)))
        ranges.append(torch.tensor([[low, high]]).expand(height * width, 2))
        low = high
    return AnchorPoints(torch.cat(xy).to(device), torch.cat(strides).to(device), torch.cat(ranges).to(device))


@dataclass(frozen=True)
class Assignment:
    """Per point of each image: class (-1: background), (B, A, 4) ltrb distance targets, centre-ness target."""

    labels: torch.Tensor  # (B, A) int64
    box_ltrb: torch.Tensor  # (B, A, 4) float, pixels; meaningful at positives only
    centerness: torch.Tensor  # (B, A) float in [0, 1]; 0 at negatives

    @property
    def positive(self) -> torch.Tensor:
        return self.labels >= 0


def pad_targets(targets: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image (boxes (K, 4), labels (K,)) -> (B, K, 4) boxes, (B, K) labels, (B, K) validity, K >= 1."""
    k = max([1, *(len(labels) for _, labels in targets)])
    boxes = torch.zeros(len(targets), k, 4, device=device)
    labels = torch.full((len(targets), k), -1, dtype=torch.int64, device=device)
    for i, (b, c) in enumerate(targets):
        boxes[i, :len(c)] = b.to(device)
        labels[i, :len(c)] = c.to(device)
    return boxes, labels, labels >= 0


@torch.no_grad()
def assign_targets(points: AnchorPoints, boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
                   ) -> Assignment:
    """FCOS targets for a batch: ``boxes`` (B, K, 4) xyxy in input pixels, ``labels``/``valid`` (B, K)."""
    x = points.xy[None, :, None, 0]  # (1, A, 1)
    y = points.xy[None, :, None, 1]
    x1, y1, x2, y2 = (boxes[:, None, :, i] for i in range(4))  # (B, 1, K) each
    ltrb = torch.stack([x - x1, y - y1, x2 - x, y2 - y], -1)  # (B, A, K, 4)
    radius = points.strides[None, :, None] * CENTER_RADIUS
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    centre_ltrb = torch.stack([x - torch.maximum(cx - radius, x1), y - torch.maximum(cy - radius, y1),
                               torch.minimum(cx + radius, x2) - x, torch.minimum(cy + radius, y2) - y], -1)
    reach = ltrb.max(-1).values
    candidate = ((centre_ltrb.min(-1).values > 0) & valid[:, None, :]
                 & (reach > points.ranges[None, :, None, 0]) & (reach <= points.ranges[None, :, None, 1]))
    area = ((x2 - x1) * (y2 - y1)).expand_as(candidate)
    area = torch.where(candidate, area, torch.full_like(area, math.inf))
    smallest, which = area.min(-1)  # (B, A): the smallest box claiming each point
    positive = torch.isfinite(smallest)
    assigned = torch.gather(labels, 1, which)
    target = torch.gather(ltrb, 2, which[..., None, None].expand(-1, -1, 1, 4))[:, :, 0]
    left_right, top_bottom = target[..., [0, 2]], target[..., [1, 3]]
    ratio = ((left_right.min(-1).values / left_right.max(-1).values.clamp(min=1e-6))
             * (top_bottom.min(-1).values / top_bottom.max(-1).values.clamp(min=1e-6)))
    centerness = ratio.clamp(0, 1).sqrt()  # negatives' distances can be < 0: clamped, then zeroed below
    return Assignment(labels=torch.where(positive, assigned, torch.full_like(assigned, -1)), box_ltrb=target,
                      centerness=torch.where(positive, centerness, torch.zeros_like(centerness)))
