"""The corruption registry, ``corrupt`` (validation, dtype round trip, seeding), name lists and suites.

A corruption is a function ``fn(images, severity, generator) -> images`` over a float32 batch
``(N, C, H, W)`` in [0, 1]; ``corrupt`` does everything around it once: checks the input,
converts uint8 to float and back (rounding, not truncating as the original scripts did),
clamps, and seeds the generator from (seed, name, severity) with a stable hash, so a call is
reproducible across processes and two corruptions never share a random stream.

Randomness is drawn for the batch as a whole (block after block, see ``BLOCK_VALUES``): the
same batch gives the same output, but an image's corruption depends on its position in the
batch (per-image generators would need a Python loop over images, which the batched design
exists to avoid).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lensforge.errors import UsageError
from lensforge.ops.corruptions._ops import stable_seed
from lensforge.registry import Registry

SEVERITIES = (1, 2, 3, 4, 5)
FAMILIES = ("noise", "blur", "weather", "digital", "viewpoint", "lighting", "occlusion")
MIN_SIDE_PX = 8  # below this the 8x8 JPEG blocks, glass-blur swaps and blur kernels stop making sense
# Images are corrupted in blocks of at most this many values (~8 MB as float32: 680 RGB images at
# 32 px, 13 at 224 px): every corruption makes several passes over its batch, and passes that
# stay in cache run 1.5-2x faster than over one big batch, with bounded memory for any batch size.
BLOCK_VALUES = 2**21

CorruptionFn = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Corruption:
    """A registered corruption and what it is.

    ``imagenet_c``: one of the 15 corruptions of Hendrycks & Dietterich's benchmark;
    ``extra``: one of their 4 held-out extras. ``stochastic``: the output depends on the seed.
    ``color_only``: a grey (1-channel) input comes back unchanged, because the corruption
    shifts colour only (saturation, white balance).
    """

    name: str
    family: str
    imagenet_c: bool
    extra: bool
    fn: CorruptionFn
    stochastic: bool = True
    color_only: bool = False


CORRUPTIONS: Registry[Corruption] = Registry("corruption")
_ORDER: list[str] = []  # registration order: the published order within each family


def register_corruption(name: str, family: str, *, imagenet_c: bool = False, extra: bool = False,
                        stochastic: bool = True, color_only: bool = False) -> Callable[[CorruptionFn], CorruptionFn]:
    """Register ``fn(images, severity, generator)`` under ``name``; duplicate names raise."""
    if family not in FAMILIES:
        raise ValueError(f"unknown corruption family {family!r}; one of {', '.join(FAMILIES)}")

    def add(fn: CorruptionFn) -> CorruptionFn:
        CORRUPTIONS.register(name)(Corruption(name, family, imagenet_c, extra, fn, stochastic, color_only))
        _ORDER.append(name)
        if SUITES:  # registered after import (a plugin): keep "full" and friends complete
            SUITES.update(build_suites())
        return fn

    return add


# ---------------------------------------------------------------------------- applying one


def corrupt(images: torch.Tensor, name: str, severity: int, *, seed: int = 0) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to a batch; same dtype, shape and device back.

    Args:
        images: uint8 ``(N, C, H, W)`` or float in [0, 1], C in {1, 3}, H and W >= 8.
        name: a registered corruption (see :func:`list_corruptions`).
        severity: 1 (mild) to 5 (strong); each level changes the images more than the last.
        seed: with the batch, name and severity, fixes every random draw.

    Raises:
        UsageError: unknown name (with close matches), severity outside 1-5, or images of the
            wrong type, dtype, rank, channel count, size or value range.
    """
    corruption = CORRUPTIONS.get(name)
    _check_severity(severity)
    _check_images(images)
    if images.shape[0] == 0:
        return images.clone()
    generator = torch.Generator(device=images.device)
    generator.manual_seed(stable_seed(seed, name, severity))
    if corruption.color_only and images.shape[1] == 1:
        return images.clone()
    out = torch.empty_like(images)
    block = max(1, BLOCK_VALUES // images[0].numel())
    with torch.no_grad():
        for first in range(0, images.shape[0], block):  # blocks draw from one generator in turn
            chunk = images[first:first + block]
            x = chunk.float().div_(255) if chunk.dtype == torch.uint8 else chunk.float()
            result = corruption.fn(x, severity, generator).clamp_(0, 1)
            out[first:first + block] = result.mul_(255).round_() if images.dtype == torch.uint8 else result
    return out


def _check_severity(severity: object) -> None:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise UsageError(f"corruption severity must be an integer from 1 to 5, got {severity!r}")


def _check_images(images: object) -> None:
    if not isinstance(images, torch.Tensor):
        raise UsageError(f"images must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise UsageError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    if images.ndim != 4:
        raise UsageError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise UsageError(f"images must have 1 (grey) or 3 (RGB) channels, got {images.shape[1]} "
                         f"(shape {tuple(images.shape)}; channels come second)")
    if min(images.shape[2:]) < MIN_SIDE_PX:
        raise UsageError(f"images must be at least {MIN_SIDE_PX}x{MIN_SIDE_PX} px, got "
                         f"{images.shape[2]}x{images.shape[3]}")
    if images.is_floating_point() and images.numel():
        low, high = torch.aminmax(images)
        if low < 0 or high > 1:
            raise UsageError(f"float images must lie in [0, 1], got values in [{float(low):.3g}, {float(high):.3g}] "
                             "(normalised? corrupt before normalising)")


# ---------------------------------------------------------------------------- names and suites


def _ordered(names: list[str]) -> list[str]:
    """Families in ``FAMILIES`` order, registration (= published) order within each."""
    rank = {name: i for i, name in enumerate(_ORDER)}
    return sorted(names, key=lambda n: (FAMILIES.index(CORRUPTIONS.get(n).family), rank[n]))


def list_corruptions(which: str = "full") -> list[str]:
    """Corruption names: "full" (all), "imagenet-c" (15), "extra" (4), "common" (the 19), or a family."""
    all_names = list(CORRUPTIONS)
    chosen = {
        "full": all_names,
        "imagenet-c": [n for n in all_names if CORRUPTIONS.get(n).imagenet_c],
        "extra": [n for n in all_names if CORRUPTIONS.get(n).extra],
        "common": [n for n in all_names if CORRUPTIONS.get(n).imagenet_c or CORRUPTIONS.get(n).extra],
    }
    if which in chosen:
        return _ordered(chosen[which])
    if which in FAMILIES:
        return _ordered([n for n in all_names if CORRUPTIONS.get(n).family == which])
    raise UsageError(f"unknown corruption set {which!r}; one of {', '.join([*chosen, *FAMILIES])}")


# The quick suite: one or two corruptions per family at severities 1, 3 and 5 (27 pairs),
# picked to span the kinds of shift (pixel noise, blur, weather, codec, geometry, light, occlusion).
QUICK_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "snow", "fog", "contrast", "jpeg_compression",
                     "rotation", "low_light", "occlusion")
QUICK_SEVERITIES = (1, 3, 5)


def _full_plan(names: list[str]) -> list[tuple[str, int]]:
    return [(name, severity) for name in names for severity in SEVERITIES]


# Filled by the package's __init__ once every family module has registered its corruptions.
SUITES: dict[str, list[tuple[str, int]]] = {}


def build_suites() -> dict[str, list[tuple[str, int]]]:
    """Every suite from the registry as it stands: "full" lists every registered corruption."""
    return {
        "full": _full_plan(list_corruptions("full")),
        "quick": [(name, s) for name in QUICK_CORRUPTIONS for s in QUICK_SEVERITIES],
        "imagenet-c": _full_plan(list_corruptions("imagenet-c")),
        "common": _full_plan(list_corruptions("common")),
    }


def suite_plan(suite: str) -> list[tuple[str, int]]:
    """The (corruption, severity) pairs of a suite: "full", "quick", "imagenet-c" or "common"."""
    if suite not in SUITES:
        raise UsageError(f"unknown corruption suite {suite!r}; one of {', '.join(SUITES)}")
    return list(SUITES[suite])
