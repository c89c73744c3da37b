"""Noise: Gaussian, shot (Poisson), impulse (salt and pepper) and speckle, per pixel and channel.

Parameters are Hendrycks & Dietterich's (``make_cifar_c.py`` at 32 px, ``make_imagenet_c.py``
at 224 px, interpolated between; see ``_ops.Published``). None is spatial: noise acts on single
pixels at every size. Each channel draws its own noise, as in the originals.
"""

from __future__ import annotations

import torch

from lensforge.ops.corruptions._ops import Published, normal, poisson, side_of
from lensforge.ops.corruptions.registry import register_corruption

GAUSSIAN_STD = Published((0.04, 0.06, 0.08, 0.09, 0.10), (0.08, 0.12, 0.18, 0.26, 0.38))  # of the [0, 1] range
SHOT_PHOTONS = Published((500, 250, 100, 75, 50), (60, 25, 12, 5, 3))  # photons at full white
IMPULSE_AMOUNT = Published((0.01, 0.02, 0.03, 0.05, 0.07), (0.03, 0.06, 0.09, 0.17, 0.27))  # share of values
SPECKLE_STD = Published((0.06, 0.10, 0.12, 0.16, 0.20), (0.15, 0.20, 0.35, 0.45, 0.60))  # relative to the value


@register_corruption("gaussian_noise", "noise", imagenet_c=True)
def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Additive white Gaussian noise (sensor read noise)."""
    std = GAUSSIAN_STD.at(severity, side_of(x))
    return x + normal(generator, x.shape, std=std, device=x.device)


@register_corruption("shot_noise", "noise", imagenet_c=True)
def shot_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Poisson photon noise: variance proportional to the signal (dim, short exposures)."""
    photons = SHOT_PHOTONS.at(severity, side_of(x))
    return poisson(x * photons, generator) / photons


@register_corruption("impulse_noise", "noise", imagenet_c=True)
def impulse_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Salt and pepper: a share of values set to 0 or 1, half each (scikit-image's "s&p")."""
    amount = IMPULSE_AMOUNT.at(severity, side_of(x))
    u = torch.rand(x.shape, generator=generator, device=x.device)  # [0, amount/2): pepper, then salt
    return torch.where(u < amount, (u >= amount / 2).to(x.dtype), x)


@register_corruption("speckle_noise", "noise", extra=True)
def speckle_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Multiplicative Gaussian noise, x + x * n (coherent imaging: radar, ultrasound)."""
    std = SPECKLE_STD.at(severity, side_of(x))
    return x + x * normal(generator, x.shape, std=std, device=x.device)
