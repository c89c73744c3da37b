"""Occlusion: opaque rectangles covering a set share of the image (not part of ImageNet-C).

The covered share is exact up to pixel rounding, so a severity means a known loss of view:
the image is split into ``PATCHES`` strips (along a random axis per image) and each strip
gets one rectangle of ``share / PATCHES`` of the image area, of random aspect and position
inside its strip, so the rectangles never overlap. Each rectangle is mid-grey or a random
colour (grey level for grey images), half and half.
"""

from __future__ import annotations

import torch

from lensforge.ops.corruptions import _ops
from lensforge.ops.corruptions.registry import register_corruption

OCCLUDED_SHARE = (0.05, 0.1, 0.2, 0.3, 0.4)  # of the image area
PATCHES = 3


@register_corruption("occlusion", "occlusion")
def occlusion(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Objects in front of the scene (a finger, a sticker, a post): ``share`` of the pixels hidden."""
    n, c, h, w = x.shape
    vertical = torch.rand(n, generator=generator, device=x.device) < 0.5  # strips side by side vs stacked
    across = torch.where(vertical, w, h)  # the axis the strips divide
    along = torch.where(vertical, h, w)
    share = OCCLUDED_SHARE[severity - 1]
    strip = torch.arange(PATCHES, device=x.device)
    strip_start = (strip[None] * across[:, None]) // PATCHES
    strip_width = ((strip[None] + 1) * across[:, None]) // PATCHES - strip_start
    area = share * h * w / PATCHES
    # width across the strip between the narrowest that still fits along the image and the strip itself
    lowest = (area / along[:, None]).clamp(max=strip_width)
    width = _ops.uniform(generator, (n, PATCHES), lowest, strip_width.float(), device=x.device)
    width = width.round().clamp(min=1).minimum(strip_width)
    length = (area / width).round().clamp(1, None).minimum(along[:, None])
    start_across = strip_start + (torch.rand((n, PATCHES), generator=generator, device=x.device)
                                  * (strip_width - width + 1)).floor()
    start_along = (torch.rand((n, PATCHES), generator=generator, device=x.device)
                   * (along[:, None] - length + 1)).floor()
    rows_start = torch.where(vertical[:, None], start_along, start_across)
    rows_size = torch.where(vertical[:, None], length, width)
    cols_start = torch.where(vertical[:, None], start_across, start_along)
    cols_size = torch.where(vertical[:, None], width, length)
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    inside = ((rows >= rows_start[..., None, None]) & (rows < (rows_start + rows_size)[..., None, None])
              & (cols >= cols_start[..., None, None]) & (cols < (cols_start + cols_size)[..., None, None]))
    grey = torch.rand((n, PATCHES, 1), generator=generator, device=x.device) < 0.5
    random_colour = torch.rand((n, PATCHES, c), generator=generator, device=x.device)
    colour = torch.where(grey, torch.full_like(random_colour, 0.5), random_colour)  # (n, patches, c)
    fill = torch.einsum("nphw,npc->nchw", inside.float(), colour)
    covered = inside.any(1, keepdim=True)
    return torch.where(covered, fill, x)
