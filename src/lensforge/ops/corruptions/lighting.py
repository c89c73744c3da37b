"""Lighting: low light (sensor noise), gamma (tone curve), colour temperature, cast shadows.

Not part of ImageNet-C. Light is modelled in linear intensity, decoded from the pixel values
with a 2.2 power law (``_ops.to_linear``) and encoded back, because exposure, white balance
and shadows multiply light, not gamma-encoded pixel values.
"""

from __future__ import annotations

import math

import torch

from lensforge.ops.corruptions import _ops
from lensforge.ops.corruptions.registry import register_corruption

# Low light: the exposure keeps this share of the light; photon (shot) noise for a sensor that
# collects FULL_WELL_ELECTRONS at full white, plus read noise; no gain afterwards, so the
# image stays dark, as a capture that ran out of light.
LOW_LIGHT_EXPOSURE = (0.5, 0.3, 0.18, 0.1, 0.05)
LOW_LIGHT_READ_NOISE = (2.0, 3.0, 4.0, 5.0, 6.0)  # electrons RMS
FULL_WELL_ELECTRONS = 1000.0

GAMMA = (1.3, 1.6, 2.0, 2.5, 3.2)  # pixel ** gamma or ** (1 / gamma), drawn per image

# White balance off by a shift from 6500 K (daylight) to a warmer or cooler source, drawn per image.
REFERENCE_KELVIN = 6500.0
WARM_KELVIN = (5500.0, 4700.0, 4000.0, 3400.0, 2900.0)
COOL_KELVIN = (7700.0, 9200.0, 11000.0, 13500.0, 17000.0)

SHADOW_DARKNESS = (0.4, 0.55, 0.7, 0.8, 0.9)  # share of the light the shadow removes
SHADOW_EDGES = 5  # half-planes per shadow: a convex polygon, or a band (two of them active)
SHADOW_PENUMBRA = 0.03  # soft edge width, share of the side


@register_corruption("low_light", "lighting")
def low_light(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Under-exposed capture: less light, so Poisson photon noise and read noise show."""
    exposure = LOW_LIGHT_EXPOSURE[severity - 1]
    electrons = _ops.poisson(_ops.to_linear(x) * exposure * FULL_WELL_ELECTRONS, generator)
    electrons = electrons + _ops.normal(generator, x.shape, std=LOW_LIGHT_READ_NOISE[severity - 1], device=x.device)
    return _ops.from_linear(electrons / FULL_WELL_ELECTRONS)


@register_corruption("gamma", "lighting")
def gamma(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """A wrong tone curve: pixel ** gamma (darker mid-tones) or ** (1 / gamma) (lighter), per image."""
    exponent = GAMMA[severity - 1] ** _ops.random_sign(generator, x.shape[0], device=x.device)
    return x.clamp(min=0) ** exponent.view(-1, 1, 1, 1)


def kelvin_to_rgb(kelvin: torch.Tensor) -> torch.Tensor:
    """(n, 3) linear RGB of a black body at ``kelvin`` (Tanner Helland's fit to the Planck locus)."""
    t = kelvin / 100
    red = torch.where(t <= 66, torch.full_like(t, 255.0), 329.698727446 * (t - 60).clamp(min=1e-6) ** -0.1332047592)
    green = torch.where(t <= 66, 99.4708025861 * t.log() - 161.1195681661,
                        288.1221695283 * (t - 60).clamp(min=1e-6) ** -0.0755148492)
    blue = torch.where(t >= 66, torch.full_like(t, 255.0),
                       torch.where(t <= 19, torch.zeros_like(t), 138.5177312231 * (t - 10).clamp(min=1e-6).log()
                                   - 305.0447927307))
    return _ops.to_linear(torch.stack([red, green, blue], -1) / 255)


@register_corruption("color_temperature", "lighting", color_only=True)
def color_temperature(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """White balance set for daylight under a warmer or cooler light (per image).

    Channel gains are the source's black-body colour over daylight's, normalised to keep the
    luminance, applied to linear light. A grey image comes back unchanged (``corrupt`` skips it):
    a monochrome sensor sees no white-balance shift at constant exposure.
    """
    n = x.shape[0]
    warm = _ops.random_sign(generator, n, device=x.device) > 0
    kelvin = torch.where(warm, WARM_KELVIN[severity - 1], COOL_KELVIN[severity - 1])
    gains = kelvin_to_rgb(kelvin) / kelvin_to_rgb(x.new_tensor([REFERENCE_KELVIN]))
    gains = gains / (gains @ x.new_tensor(_ops.LUMA_WEIGHTS))[:, None]
    return _ops.from_linear(_ops.to_linear(x) * gains[:, :, None, None])


@register_corruption("shadow", "lighting")
def shadow(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """A cast shadow: a soft-edged convex polygon or band, darkened in linear light."""
    mask = _shadow_mask(generator, *x.shape[-2:], x.shape[0], x.device)
    light = 1 - SHADOW_DARKNESS[severity - 1] * mask
    return _ops.from_linear(_ops.to_linear(x) * light)


def _shadow_mask(generator: torch.Generator, h: int, w: int, n: int, device: torch.device) -> torch.Tensor:
    """(n, 1, H, W) soft masks, each the intersection of ``SHADOW_EDGES`` half-planes.

    Polygons: vertices at sorted random angles around a random centre inside the image, radii
    30-60% of the side; each edge's half-plane contains the centre, so the shape is the convex
    region around it. Bands (half the images): two parallel edges 20-40% of the side apart
    through the centre, the other half-planes moved far outside.
    """
    side = min(h, w)
    centre = torch.stack([_ops.uniform(generator, (n,), 0.2 * w, 0.8 * w, device=device),
                          _ops.uniform(generator, (n,), 0.2 * h, 0.8 * h, device=device)], -1)
    angles = torch.sort(_ops.uniform(generator, (n, SHADOW_EDGES), 0, 2 * math.pi, device=device), 1).values
    radii = _ops.uniform(generator, (n, SHADOW_EDGES), 0.3 * side, 0.6 * side, device=device)
    vertices = centre[:, None] + radii[..., None] * torch.stack([angles.cos(), angles.sin()], -1)
    edges = vertices.roll(-1, 1) - vertices
    normals = torch.stack([edges[..., 1], -edges[..., 0]], -1)  # outward for counter-clockwise vertices
    normals = normals / normals.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    offsets = (normals * vertices).sum(-1)  # inside: normal . p <= offset
    inside_centre = (normals * centre[:, None]).sum(-1) <= offsets
    normals = torch.where(inside_centre[..., None], normals, -normals)  # a reflex gap flips an edge
    offsets = torch.where(inside_centre, offsets, -offsets)
    band = torch.rand(n, generator=generator, device=device) < 0.5
    normals, offsets = _as_bands(generator, band, centre, normals, offsets, side)
    points = _ops.pixel_grid(h, w, device).reshape(1, 1, h * w, 2)
    distance = (normals[:, :, None] * points).sum(-1) - offsets[..., None]  # > 0 outside
    softness = max(SHADOW_PENUMBRA * side, 0.5)
    mask = torch.sigmoid(-distance / softness).prod(1)
    return mask.view(n, 1, h, w)


def _as_bands(generator: torch.Generator, band: torch.Tensor, centre: torch.Tensor, normals: torch.Tensor,
              offsets: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the half-planes of the images marked ``band`` by a straight band through the centre."""
    n, device = centre.shape[0], centre.device
    angle = _ops.uniform(generator, (n,), 0, math.pi, device=device)
    width = _ops.uniform(generator, (n,), 0.2 * side, 0.4 * side, device=device)
    normal = torch.stack([angle.cos(), angle.sin()], -1)
    along = (normal * centre).sum(-1)
    band_normals = torch.zeros_like(normals)
    band_normals[:, 0], band_normals[:, 1] = normal, -normal
    band_normals[:, 2:, 0] = 1.0
    band_offsets = torch.full_like(offsets, 1e6)  # far away: always satisfied
    band_offsets[:, 0], band_offsets[:, 1] = along + width / 2, -(along - width / 2)
    pick = band[:, None]
    return torch.where(pick[..., None], band_normals, normals), torch.where(pick, band_offsets, offsets)
