"""Digital: contrast, elastic transform, pixelate, JPEG compression and saturation.

Parameters are Hendrycks & Dietterich's at 32 px (CIFAR-10-C) and 224 px (ImageNet-C) unless
a comment says why they were changed (elastic, saturate: to make every severity stronger than
the one before). JPEG is a real baseline JPEG round trip done with tensors: JFIF YCbCr, 4:2:0
chroma subsampling, 8x8 DCT with the libjpeg quality-scaled tables, triangle ("fancy")
chroma upsampling, 8-bit rounding between stages; it stays within about one grey level of
Pillow's encoder at the same quality while treating the whole batch at once.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from lensforge.ops.corruptions import _ops
from lensforge.ops.corruptions._ops import SMALL_REFERENCE_PX, Published, side_of
from lensforge.ops.corruptions.registry import SEVERITIES, register_corruption

# ---------------------------------------------------------------------------- contrast

CONTRAST_FACTOR = Published((0.75, 0.5, 0.4, 0.3, 0.15), (0.4, 0.3, 0.2, 0.1, 0.05))


@register_corruption("contrast", "digital", imagenet_c=True, stochastic=False)
def contrast(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Low contrast (haze, a washed-out screen): deviations from each channel's mean times a factor."""
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) * CONTRAST_FACTOR.at(severity, side_of(x)) + mean


# ---------------------------------------------------------------------------- elastic

# Shares of the image side. Hendrycks' elastic transform is a random affine jitter of three
# points (max `affine`) followed by a smooth displacement field (noise blurred by `sigma`,
# times `alpha`). The published severities trade the two off and are not monotone (CIFAR-10-C's
# severity 1 is the largest affine jitter and no field; ImageNet-C's 1-2 jitter ten times more
# than its 3-5), so both ramp up here: CIFAR-10-C's (alpha, sigma) pairs as published, its five
# affine jitters sorted ascending, at every image size.
ELASTIC_ALPHA = (0.0, 0.05, 0.08, 0.1, 0.1)
ELASTIC_SIGMA = (0.0, 0.2, 0.06, 0.04, 0.03)
ELASTIC_AFFINE = (0.03, 0.05, 0.06, 0.07, 0.08)


@register_corruption("elastic_transform", "digital", imagenet_c=True)
def elastic_transform(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Local stretching and shrinking: random affine jitter plus a smooth displacement field.

    The field is drawn at 32 px (CIFAR-10-C's size) and stretched to the image: blurred white
    noise loses amplitude as its blur widens in pixels, so drawing it at the image size would
    shrink the warp, as a share of the image, at larger sizes. The original resamples twice (the
    affine warp, then the field); here the maps are composed and the image sampled once
    (borders mirrored), which blurs it less.
    """
    n, _, h, w = x.shape
    side = min(h, w)
    points = _ops.pixel_grid(h, w, x.device).reshape(1, h * w, 2)
    if ELASTIC_ALPHA[severity - 1] > 0:
        points = points + _displacement_field(generator, severity, n, h, w, x.device).flatten(2).transpose(1, 2)
    inverse = _random_affine_inverse(generator, n, h, w, ELASTIC_AFFINE[severity - 1] * side, x.device)
    coords = points @ inverse[:, :, :2].transpose(1, 2) + inverse[:, None, :, 2]
    return _ops.sample(x, coords.view(n, h, w, 2), padding="reflection")


def _displacement_field(generator: torch.Generator, severity: int, n: int, h: int, w: int,
                        device: torch.device) -> torch.Tensor:
    """(n, 2, H, W) displacements in px: Hendrycks' blurred uniform noise, drawn at 32 px and stretched."""
    side, reference = min(h, w), SMALL_REFERENCE_PX
    field_h, field_w = round(reference * h / side), round(reference * w / side)
    field = _ops.uniform(generator, (n, 2, field_h, field_w), -1.0, 1.0, device=device)
    field = _ops.gaussian_blur(field, ELASTIC_SIGMA[severity - 1] * reference, mode="symmetric", truncate=3.0)
    field = field * ELASTIC_ALPHA[severity - 1] * reference
    if (field_h, field_w) != (h, w):
        field = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return field * side / reference


def _random_affine_inverse(generator: torch.Generator, n: int, h: int, w: int, jitter: float,
                           device: torch.device) -> torch.Tensor:
    """Inverses of the affine maps moving three points around the centre by up to ``jitter`` px."""
    cy, cx, half = h // 2, w // 2, min(h, w) // 3
    source = torch.tensor([[cx + half, cy + half], [cx - half, cy + half], [cx - half, cy - half]],
                          dtype=torch.float32, device=device)
    target = source + _ops.uniform(generator, (n, 3, 2), -jitter, jitter, device=device)
    ones = torch.ones(3, 1, device=device)
    forward = torch.linalg.solve(torch.cat([source, ones], 1), target).transpose(1, 2)  # (n, 2, 3)
    linear_inverse = torch.linalg.inv(forward[:, :, :2])
    shift = -(linear_inverse @ forward[:, :, 2:])
    return torch.cat([linear_inverse, shift], 2)


# ---------------------------------------------------------------------------- pixelate

PIXELATE_FACTOR = Published((0.95, 0.9, 0.85, 0.75, 0.65), (0.6, 0.5, 0.4, 0.3, 0.25))  # share of the side kept


PIXELATE_MIN_STEP = 0.08  # consecutive severities differ by at least this share of the side


def pixelate_sizes(size: int, side: int) -> list[int]:
    """Low-resolution size per severity along an axis of ``size`` px, strictly decreasing.

    ``int(size * factor)`` as published, but each severity at least 8% of the side (and one
    pixel) below the last: the error of BOX down- and up-sampling is not monotone in the low
    size at small steps (it depends on how evenly the blocks fall; CIFAR-10-C's 28 and 27 px
    at 32 px tie), so 32 px gives 30, 27, 24, 21, 18 (published: 30, 28, 27, 24, 20), 8 px
    gives 7, 6, 5, 4, 3, and 224 px keeps ImageNet-C's 134, 112, 89, 67 and gives 49 for 56.
    """
    gap = max(1, round(PIXELATE_MIN_STEP * size))
    sizes: list[int] = []
    for severity in SEVERITIES:
        low = int(size * PIXELATE_FACTOR.at(severity, side))
        sizes.append(max(1, min(low, sizes[-1] - gap) if sizes else low))
    return sizes


@lru_cache(maxsize=64)
def _pixelate_matrix(size: int, low: int) -> torch.Tensor:
    return _ops.box_resize_matrix(low, size) @ _ops.box_resize_matrix(size, low)


@register_corruption("pixelate", "digital", imagenet_c=True, stochastic=False)
def pixelate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Upscaled low resolution: Pillow BOX down to ``factor`` of the size, BOX (nearest) back up."""
    h, w = x.shape[-2:]
    side = min(h, w)
    low_h, low_w = pixelate_sizes(h, side)[severity - 1], pixelate_sizes(w, side)[severity - 1]
    return _ops.separable(x, _pixelate_matrix(h, low_h), _pixelate_matrix(w, low_w))


# ---------------------------------------------------------------------------- JPEG

JPEG_QUALITY = Published((80, 65, 58, 50, 40), (25, 18, 15, 10, 7))
# ITU T.81 Annex K tables (row-major), scaled by quality as libjpeg's jpeg_quality_scaling.
LUMA_TABLE = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
              14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
              49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
CHROMA_TABLE = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
                47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32
RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
YCBCR_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


def quantization_table(base: tuple[int, ...], quality: int) -> torch.Tensor:
    """libjpeg's quality scaling with baseline (<= 255) entries."""
    quality = min(max(quality, 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    table = (torch.tensor(base, dtype=torch.int64) * scale + 50) // 100
    return table.clamp(1, 255).float().view(8, 8)


@lru_cache(maxsize=1)
def dct_matrix() -> torch.Tensor:
    """Orthonormal 8-point DCT-II; JPEG's 2-D DCT is D @ block @ D^T."""
    k = torch.arange(8, dtype=torch.float64)
    matrix = torch.cos((2 * k[None] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    matrix[0] /= math.sqrt(2)
    return matrix.float()


@lru_cache(maxsize=16)
def _blockwise_dct(size: int) -> torch.Tensor:
    """(size, size) block-diagonal DCT: one product transforms every 8-pixel block along an axis."""
    return torch.block_diag(*[dct_matrix()] * (size // 8))


def _quantize_planes(planes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """DCT, quantise and reconstruct every 8x8 block of (n, k, H, W) planes (H, W multiples of 8)."""
    h, w = planes.shape[-2:]
    rows, cols = _blockwise_dct(h).to(planes), _blockwise_dct(w).to(planes)
    step = table.to(planes).repeat(h // 8, w // 8)  # each coefficient's quantiser step, in place
    coefficients = rows @ (planes - 128) @ cols.T
    restored = torch.round(coefficients / step) * step
    return torch.round(rows.T @ restored @ cols + 128).clamp(0, 255)


def _colour_transform(matrix: tuple[tuple[float, ...], ...], pixels: torch.Tensor) -> torch.Tensor:
    n, c, h, w = pixels.shape
    return (pixels.new_tensor(matrix) @ pixels.reshape(n, c, h * w)).view(n, c, h, w)


def jpeg_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode a float batch in [0, 1] as baseline JPEG at ``quality`` (1-100)."""
    n, c, h, w = x.shape
    mcu = 16 if c == 3 else 8  # 4:2:0 subsampling makes 16x16 colour MCUs
    pad_h, pad_w = -h % mcu, -w % mcu
    pixels = torch.round(x * 255)
    if pad_h or pad_w:
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h), mode="replicate")  # edges repeated, as libjpeg
    luma_table, chroma_table = quantization_table(LUMA_TABLE, quality), quantization_table(CHROMA_TABLE, quality)
    if c == 1:
        return _quantize_planes(pixels, luma_table)[..., :h, :w] / 255
    ycc = _colour_transform(RGB_TO_YCBCR, pixels) + pixels.new_tensor([0.0, 128.0, 128.0]).view(1, 3, 1, 1)
    ycc = torch.round(ycc).clamp(0, 255)  # 8-bit planes, as libjpeg converts before subsampling
    luma = _quantize_planes(ycc[:, :1], luma_table)
    chroma = _quantize_planes(torch.round(F.avg_pool2d(ycc[:, 1:], 2)), chroma_table) - 128  # 4:2:0
    # libjpeg's "fancy" h2v2 upsampling is the 3/4-1/4 triangle filter, i.e. bilinear at 2x
    chroma = torch.round(F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False))
    rgb = _colour_transform(YCBCR_TO_RGB, torch.cat([luma, chroma], 1))
    return torch.round(rgb).clamp(0, 255)[..., :h, :w] / 255


@register_corruption("jpeg_compression", "digital", imagenet_c=True, stochastic=False)
def jpeg_compression(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """JPEG artefacts (blocking, ringing, colour bleeding) at a low quality setting."""
    return jpeg_round_trip(x, round(JPEG_QUALITY.at(severity, side_of(x))))


# ---------------------------------------------------------------------------- saturate

# HSV saturation S' = clip(S * factor + offset). The published severities 1-2 *desaturate*
# (factors 0.3 and 0.1) and 3-5 oversaturate, so the change shrinks from 2 to 3 and the levels
# are not ordered. Severities 3-5 are kept as published; 1-2 are milder oversaturations on the
# way to 3, so every level moves every pixel further than the one before.
SATURATE_FACTOR = Published((1.15, 1.3, 1.5, 2, 2.5), (1.3, 1.6, 2, 5, 20))
SATURATE_OFFSET = Published((0, 0, 0, 0.1, 0.2), (0, 0, 0, 0.1, 0.2))


@register_corruption("saturate", "digital", extra=True, stochastic=False, color_only=True)
def saturate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Oversaturated colour. Grey images come back unchanged (``corrupt`` skips colour-only ones).

    With H and V fixed, RGB = V - S * (V - RGB) / S, so the HSV round trip reduces to scaling
    each pixel's distance from V by S'/S. Grey pixels (S = 0) have hue 0 in scikit-image, which
    the original reproduces as a red tint when the offset lifts S; so does this.
    """
    side = side_of(x)
    value = x.amax(1, keepdim=True)
    spread = value - x.amin(1, keepdim=True)
    sat = torch.where(value > 0, spread / value.clamp(min=1e-12), torch.zeros_like(value))
    new_sat = (sat * SATURATE_FACTOR.at(severity, side) + SATURATE_OFFSET.at(severity, side)).clamp(0, 1)
    scaled = value - (value - x) * new_sat / sat.clamp(min=1e-12)
    red_hue = value * (1 - new_sat * x.new_tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1))
    return torch.where(sat > 0, scaled, red_hue)
