"""Viewpoint shifts: rotation, perspective, scale and translation (not part of ImageNet-C).

Each image draws its own direction (sign, angle, in or out) while the magnitude is fixed by
the severity, so every severity moves the content further than the one before. Warps are
bilinear via ``grid_sample`` with *mirrored* borders: a constant border would paint black or
grey wedges, a cue no camera produces and that a model can key on, while mirroring keeps the
local statistics of the image (at the price of mirrored content near the edges).
"""

from __future__ import annotations

import math

import torch

from lensforge.ops.corruptions import _ops
from lensforge.ops.corruptions.registry import register_corruption

ROTATION_DEG = (5.0, 10.0, 15.0, 22.5, 30.0)  # clockwise or counter-clockwise
PERSPECTIVE_DISTORTION = (0.07, 0.14, 0.21, 0.28, 0.35)  # corners move in by up to this share of half the side
SCALE_FACTOR = (1.1, 1.2, 1.3, 1.45, 1.6)  # zoom in by the factor or out by its inverse
TRANSLATION_SHARE = (0.04, 0.08, 0.12, 0.16, 0.2)  # shift as a share of the side, any direction


def _affine(linear: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """(n, 3, 3) homogeneous matrices from (n, 2, 2) linear parts and (n, 2) shifts."""
    n = linear.shape[0]
    matrices = torch.zeros(n, 3, 3, device=linear.device)
    matrices[:, :2, :2] = linear
    if shift is not None:
        matrices[:, :2, 2] = shift
    matrices[:, 2, 2] = 1
    return matrices


# Each viewpoint corruption is its matrices (output -> input pixel coordinates, centred; see
# _ops.warp_projective) and a warp by them: lensforge.ops.corruptions.boxes moves a detector's
# boxes with the same matrices, drawn from the same generator.


def rotation_matrices(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    angle = math.radians(ROTATION_DEG[severity - 1]) * _ops.random_sign(generator, n, device=x.device)
    cos, sin = angle.cos(), angle.sin()
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
    return _affine(linear)


def scale_matrices(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    factor = SCALE_FACTOR[severity - 1] ** _ops.random_sign(generator, n, device=x.device)
    return _affine(torch.eye(2, device=x.device)[None] / factor[:, None, None])  # output -> input coordinates


def translation_matrices(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    distance = TRANSLATION_SHARE[severity - 1] * min(x.shape[-2:])
    direction = _ops.uniform(generator, (n,), 0.0, 2 * math.pi, device=x.device)
    shift = distance * torch.stack([direction.cos(), direction.sin()], -1)
    return _affine(torch.eye(2, device=x.device).expand(n, 2, 2), shift)


def perspective_matrices(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    half = x.new_tensor([(w - 1) / 2, (h - 1) / 2])
    corners = x.new_tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half  # centred pixel coordinates
    pull = PERSPECTIVE_DISTORTION[severity - 1] * _ops.uniform(generator, (n, 4, 2), 0.5, 1.0, device=x.device)
    moved = corners * (1 - pull)  # where each corner of the input lands in the output
    return _homography(moved, corners.expand(n, 4, 2))


MATRICES = {"rotation": rotation_matrices, "scale": scale_matrices, "translation": translation_matrices,
            "perspective": perspective_matrices}  # the corruptions that move content, by name


@register_corruption("rotation", "viewpoint")
def rotation(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Camera roll: rotation about the centre by the severity's angle, either way."""
    return _ops.warp_projective(x, rotation_matrices(x, severity, generator))


@register_corruption("scale", "viewpoint")
def scale(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Closer or farther: zoom about the centre by the factor (in) or its inverse (out)."""
    return _ops.warp_projective(x, scale_matrices(x, severity, generator))


@register_corruption("translation", "viewpoint")
def translation(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Off-centre framing: a shift by the severity's share of the side, in a random direction."""
    return _ops.warp_projective(x, translation_matrices(x, severity, generator))


@register_corruption("perspective", "viewpoint")
def perspective(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Oblique view: a homography moving each corner inwards by 50-100% of the severity's share.

    As torchvision's ``RandomPerspective`` (corners pulled in by up to ``distortion`` times half
    the side), but with at least half the maximum, so severities do not overlap.
    """
    return _ops.warp_projective(x, perspective_matrices(x, severity, generator))


def _homography(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) homographies mapping 4 source points to 4 target points each (direct linear solve)."""
    n = source.shape[0]
    sx, sy = source[..., 0], source[..., 1]
    tx, ty = target[..., 0], target[..., 1]
    zeros, ones = torch.zeros_like(sx), torch.ones_like(sx)
    rows_x = torch.stack([sx, sy, ones, zeros, zeros, zeros, -sx * tx, -sy * tx], -1)
    rows_y = torch.stack([zeros, zeros, zeros, sx, sy, ones, -sx * ty, -sy * ty], -1)
    system = torch.cat([rows_x, rows_y], 1)  # (n, 8, 8)
    solution = torch.linalg.solve(system, torch.cat([tx, ty], 1))
    return torch.cat([solution, solution.new_ones(n, 1)], 1).view(n, 3, 3)
