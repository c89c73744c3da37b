"""Input-quality checks: thresholds from real training images flag bad inputs and pass normal ones."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lensforge.data.preprocess import Preprocess, resize_to_input
from lensforge.data.sources import open_source
from lensforge.data.table import load_table
from lensforge.deploy.guardrails import QUALITY_CODES, QualityThresholds, image_statistics, quality_issues
from lensforge.errors import DataError
from lensforge.stress.quality import (
    CONTRAST_FLOOR,
    DARK_FLOOR,
    fit_quality,
    flag_rates,
    reference_statistics,
    thresholds_from_reference,
)

RGB = Preprocess(input_size=(32, 32))
GRAY = Preprocess(input_size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))


@pytest.fixture(scope="module")
def shapes():
    """Training (300) and held-out (200) shapes images at 32 px, from different seeds."""
    train = load_table(open_source("builtin:shapes?n=300&size=32&seed=0"), RGB).images
    held_out = load_table(open_source("builtin:shapes?n=200&size=32&seed=1"), RGB).images
    return train, held_out


@pytest.fixture(scope="module")
def thresholds(shapes):
    return QualityThresholds.from_dict(fit_quality(shapes[0], RGB.input_size)["thresholds"])


def _blur(image: np.ndarray, radius: float) -> np.ndarray:
    pil = Image.fromarray(image.transpose(1, 2, 0))
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius))).transpose(2, 0, 1)


def _bad_versions(image: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "too_dark": (image * 0.08).astype(np.uint8),
        "overexposed": np.clip(image.astype(np.int32) * 2 + 230, 0, 255).astype(np.uint8),  # blown out
        "blurred": _blur(image, 3.0),
        "low_contrast": np.full_like(image, 140),
    }


def test_normal_held_out_images_pass(shapes, thresholds):
    rates = flag_rates(shapes[1], thresholds)
    assert rates["any"] <= 0.02, rates


@pytest.mark.parametrize("code", ["too_dark", "overexposed", "blurred", "low_contrast"])
def test_each_bad_image_is_flagged(shapes, thresholds, code):
    images = np.stack([_bad_versions(image)[code] for image in shapes[1][:20]])
    issues = quality_issues(images, thresholds)
    assert np.mean([code in row for row in issues]) >= 0.9, issues


def test_flat_image_is_low_contrast_not_blurred(thresholds):
    flat = np.full((1, 3, 32, 32), 128, dtype=np.uint8)
    assert quality_issues(flat, thresholds) == [["low_contrast"]]
    assert np.isnan(image_statistics(flat)["sharpness"][0])  # undefined, so blur is not judged


def test_too_small_uses_the_decoded_size(shapes, thresholds):
    images = shapes[1][:3]
    issues = quality_issues(images, thresholds, [(5, 5), (32, 32), None])
    assert "too_small" in issues[0] and "too_small" not in issues[1] and "too_small" not in issues[2]
    assert thresholds.min_side_px == 32  # the model input: the training images are 32 px


def test_grayscale_digits_reference(tmp_path):
    table = load_table(open_source("builtin:digits"), GRAY)
    entry = fit_quality(table.images[:1000], GRAY.input_size, native_sides=[8], check_images=table.images[1000:])
    limits = QualityThresholds.from_dict(entry["thresholds"])
    assert limits.min_side_px == 8  # digits are 8x8: an 8x8 input is normal for this model
    assert entry["flag_rate_in_distribution"]["any"] <= 0.02
    dark = (table.images[1000:1010] * 0.05).astype(np.uint8)
    assert all("too_dark" in row for row in quality_issues(dark, limits))
    tiny = resize_to_input(Image.fromarray(np.full((5, 5), 200, np.uint8)), GRAY)[None]
    assert "too_small" in quality_issues(tiny, limits, [(5, 5)])[0]


def test_thresholds_follow_the_rules():
    stats = {"mean_luminance": {"p0.5": 60.0}, "saturated_fraction": {"p99.5": 0.2},
             "sharpness": {"p0.5": 0.4}, "contrast": {"p0.5": 2.0}}
    limits = thresholds_from_reference(stats, (32, 32), native_sides=[100, 200])
    assert limits.dark_below == 30.0 and limits.overexposed_above == pytest.approx(0.6)
    assert limits.blurred_below == 0.2
    assert limits.low_contrast_below == CONTRAST_FLOOR  # half of 2.0 is below the floor
    assert limits.min_side_px == 32
    stats["mean_luminance"]["p0.5"] = 1.0
    assert thresholds_from_reference(stats, (32, 32)).dark_below == DARK_FLOOR
    stats["saturated_fraction"]["p99.5"] = 1.0
    assert thresholds_from_reference(stats, (32, 32)).overexposed_above == 0.98


def test_reference_statistics_summarise_each_statistic(shapes):
    stats = reference_statistics(shapes[0])
    assert set(stats) == {"mean_luminance", "saturated_fraction", "contrast", "sharpness"}
    for summary in stats.values():
        assert summary["p0.5"] <= summary["median"] <= summary["p99.5"]


def test_tiny_or_malformed_inputs_are_clear_errors():
    with pytest.raises(DataError, match="too small"):
        image_statistics(np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(DataError, match="shape"):
        image_statistics(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(DataError, match="at least 20"):
        reference_statistics(np.zeros((5, 3, 32, 32), np.uint8))


def test_codes_are_the_documented_ones():
    assert QUALITY_CODES == ("too_dark", "overexposed", "blurred", "low_contrast", "too_small")
