"""Input-quality reference: thresholds for dark, overexposed, blurred, flat and tiny inputs.

The statistics are computed by :func:`lensforge.deploy.guardrails.image_statistics`,
the same NumPy code that checks inputs at inference, on the training images *as the
model sees them* (resized to its input): what matters is what reaches the network, so
a large photo that is sharp after downscaling is not called blurred.

Thresholds sit well outside what training data does (percentiles, then a margin), so
that normal inputs pass and only clearly bad ones are flagged:

- ``too_dark``: mean luminance below half the 0.5th percentile of training, and always
  below 4 grey levels (of 255) — a near-black image carries nothing to classify;
- ``overexposed``: a fraction of near-saturated pixels (luma >= 250) above the midpoint
  between the 99.5th percentile of training and 1, and always above 0.98;
- ``blurred``: sharpness (Laplacian variance / luminance variance) below half its
  0.5th training percentile;
- ``low_contrast``: luminance std below half its 0.5th training percentile, and always
  below 2 grey levels;
- ``too_small``: a decoded image whose shorter side is below the smaller of the model
  input side and the training images' own (0.5th percentile) side, never below 8 px.

The floors ("always") are what make the checks sane when training data is itself
extreme; the margins keep the false-alarm rate on in-distribution data near zero
(the fraction of validation images flagged is reported next to the thresholds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lensforge.deploy.guardrails import MIN_SIDE_PX, QUALITY_CODES, QualityThresholds, image_statistics, quality_issues
from lensforge.errors import DataError

LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
LOW_MARGIN = 0.5  # low-side thresholds: this fraction of the 0.5th percentile
DARK_FLOOR = 4.0  # grey levels of mean luminance: darker is always too dark
CONTRAST_FLOOR = 2.0  # grey levels of luminance std: flatter is always low contrast
OVEREXPOSED_CAP = 0.98  # a larger near-saturated fraction is always overexposed
MIN_REFERENCE_IMAGES = 20
MAX_REFERENCE_IMAGES = 2000  # a seeded subsample: percentiles need no more, and memory stays bounded
_CHUNK = 256  # images per vectorised step (a float32 copy of each is made)


def _statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`image_statistics` in chunks, so large images do not need N x H x W float copies at once."""
    parts = [image_statistics(images[i:i + _CHUNK]) for i in range(0, len(images), _CHUNK)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _subsample(images: np.ndarray, seed: int = 0) -> np.ndarray:
    if len(images) <= MAX_REFERENCE_IMAGES:
        return images
    pick = np.random.default_rng(seed).choice(len(images), MAX_REFERENCE_IMAGES, replace=False)
    return images[np.sort(pick)]


def reference_statistics(images: np.ndarray) -> dict[str, dict[str, float]]:
    """0.5th percentile, median and 99.5th percentile of each quality statistic over ``images``."""
    if len(images) < MIN_REFERENCE_IMAGES:
        raise DataError(f"quality reference needs at least {MIN_REFERENCE_IMAGES} images, got {len(images)}")
    summary = {}
    for name, values in _statistics(images).items():
        finite = values[np.isfinite(values)]
        low, median, high = np.percentile(finite, [LOW_PERCENTILE, 50, HIGH_PERCENTILE]) if len(finite) else (
            np.nan, np.nan, np.nan)
        summary[name] = {"p0.5": float(low), "median": float(median), "p99.5": float(high)}
    return summary


def thresholds_from_reference(
    stats: dict[str, dict[str, float]],
    input_size: tuple[int, int],
    native_sides: Sequence[int] | None = None,
) -> QualityThresholds:
    """Thresholds from :func:`reference_statistics` (see the module doc for the rules)."""
    min_side = min(input_size)
    if native_sides is not None and len(native_sides):
        min_side = min(min_side, int(np.percentile(native_sides, LOW_PERCENTILE)))
    sharpness = stats["sharpness"]["p0.5"]
    saturated = stats["saturated_fraction"]["p99.5"]
    return QualityThresholds(
        dark_below=max(LOW_MARGIN * stats["mean_luminance"]["p0.5"], DARK_FLOOR),
        overexposed_above=min(saturated + 0.5 * (1.0 - saturated), OVEREXPOSED_CAP),
        blurred_below=LOW_MARGIN * sharpness if np.isfinite(sharpness) else 0.0,
        low_contrast_below=max(LOW_MARGIN * stats["contrast"]["p0.5"], CONTRAST_FLOOR),
        min_side_px=max(MIN_SIDE_PX, min_side),
    )


def flag_rates(images: np.ndarray, thresholds: QualityThresholds) -> dict[str, float]:
    """Fraction of ``images`` failing each check (and any check), e.g. on in-distribution data."""
    issues = [row for i in range(0, len(images), _CHUNK) for row in quality_issues(images[i:i + _CHUNK], thresholds)]
    rates = {code: float(np.mean([code in row for row in issues])) for code in QUALITY_CODES}
    rates["any"] = float(np.mean([bool(row) for row in issues]))
    return rates


def fit_quality(
    train_images: np.ndarray,
    input_size: tuple[int, int],
    *,
    native_sides: Sequence[int] | None = None,
    check_images: np.ndarray | None = None,
) -> dict[str, Any]:
    """The manifest's ``guardrails.quality`` entry: reference statistics, thresholds, flag rates.

    Args:
        train_images: uint8 (N, C, H, W) training images at the model input size (a seeded
            subsample of ``MAX_REFERENCE_IMAGES`` is used when there are more).
        input_size: the model input (height, width).
        native_sides: shorter sides (px) of the training images as decoded, when known.
        check_images: held-out in-distribution images whose flag rates are reported.
    """
    train_images = _subsample(train_images)
    stats = reference_statistics(train_images)
    thresholds = thresholds_from_reference(stats, input_size, native_sides)
    entry: dict[str, Any] = {"statistics": stats, "thresholds": thresholds.to_dict(),
                             "fitted_on": {"images": len(train_images)}}
    if check_images is not None and len(check_images):
        entry["flag_rate_in_distribution"] = flag_rates(_subsample(check_images), thresholds)
    return entry
