"""Corruptions and shifts for robustness tests, batched and deterministic.

``corrupt(images, name, severity, seed=seed)`` applies one of 28 corruptions at severity 1-5
to a whole batch ``(N, C, H, W)`` (uint8 or float in [0, 1], grey or RGB, >= 8x8 px) at once.

- The 15 ImageNet-C corruptions and its 4 extras follow Hendrycks & Dietterich (ICLR 2019),
  with their published parameters: CIFAR-10-C's at 32 px, ImageNet-C's at 224 px, and
  between them interpolated in log(size); lengths (blur radii, flake sizes, shifts) scale with
  the image (see ``_ops.Published``). Where a published definition could not be kept (frost
  photographs, a few non-monotone severities) the module says what changed and why.
- Viewpoint (rotation, perspective, scale, translation), lighting (low_light, gamma,
  color_temperature, shadow) and occlusion add the shifts a deployed camera meets.

``list_corruptions("common")`` names the 19 of ImageNet-C plus extras; ``SUITES`` /
``suite_plan`` give the (name, severity) pairs of the "full" and "quick" suites.
"""

from lensforge.ops.corruptions import blur, digital, geometry, lighting, noise, occlusion, weather  # noqa: F401
from lensforge.ops.corruptions.registry import (
    CORRUPTIONS,
    FAMILIES,
    SEVERITIES,
    SUITES,
    Corruption,
    build_suites,
    corrupt,
    list_corruptions,
    register_corruption,
    suite_plan,
)
from lensforge.ops.corruptions.weather import frost_textures

SUITES.update(build_suites())  # after every family module above has registered its corruptions

__all__ = ["CORRUPTIONS", "FAMILIES", "SEVERITIES", "SUITES", "Corruption", "corrupt", "frost_textures",
           "list_corruptions", "register_corruption", "suite_plan"]
