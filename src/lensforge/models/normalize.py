"""Input normalisation as a torch module: the one torch statement of ``(x / 255 - mean) / std``.

Training applies it to each batch and export puts it at the head of the ONNX graph, so a
bundle's model takes raw uint8 pixels. The constants come from
:func:`lensforge.data.preprocess.normalize_affine`, which NumPy's ``normalize`` uses too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lensforge.data.preprocess import normalize_affine


class Normalize(nn.Module):
    """Pixels (any dtype, uint8 included) -> float32 model input: ``x * scale + shift`` per channel.

    ``scale = 1 / (pixel_max * std)`` and ``shift = -mean / std``: one Mul and one Add in ONNX
    (after a Cast for uint8 input), exact, unlike folding them into the first convolution,
    whose zero padding would then pad with the wrong value.

    Args:
        mean, std: per-channel statistics of pixels scaled to [0, 1].
        pixel_max: 255 for uint8 pixels, 1 for pixels already in [0, 1].
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, pixel_max: float = 255.0) -> None:
        super().__init__()
        scale, shift = normalize_affine(mean, std, pixel_max)
        # not persistent: derived from the preprocessing, never part of a checkpoint
        self.register_buffer("scale", torch.from_numpy(scale).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", torch.from_numpy(shift).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(torch.float32) * self.scale + self.shift

    def extra_repr(self) -> str:
        return f"channels={self.scale.shape[1]}"
