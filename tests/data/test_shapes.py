"""Tests for the procedural shapes generator (lensforge.data.shapes)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lensforge.data.shapes import (
    EXTRA_SHAPE_CLASSES,
    SHAPE_CLASSES,
    ShapesData,
    ShapesDomain,
    generate_shapes,
)
from lensforge.errors import UsageError


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    """[x0, y0, x1, y1] of the mask pixels, in pixel-edge coordinates."""
    size = masks.shape[-1]
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    return np.stack([cols.argmax(1), rows.argmax(1),
                     size - cols[:, ::-1].argmax(1), size - rows[:, ::-1].argmax(1)], axis=1)


def test_shapes_and_dtypes() -> None:
    data = generate_shapes(13, size=32, seed=1, return_masks=True)
    assert isinstance(data, ShapesData)
    assert len(data) == 13
    assert data.images.shape == (13, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (13,) and data.labels.dtype == np.int64
    assert data.boxes.shape == (13, 4) and data.boxes.dtype == np.float32
    assert data.masks is not None and data.masks.shape == (13, 32, 32)
    assert data.masks.dtype == np.bool_
    assert data.class_names == SHAPE_CLASSES
    assert generate_shapes(4).masks is None
    assert SHAPE_CLASSES[:6] == ("circle", "square", "triangle", "star", "cross", "hexagon")


def test_same_arguments_give_identical_bytes() -> None:
    shifted = ShapesDomain.preset("shifted")
    a = generate_shapes(40, size=24, seed=7, domain=shifted, return_masks=True)
    b = generate_shapes(40, size=24, seed=7, domain=shifted, return_masks=True)
    assert a.images.tobytes() == b.images.tobytes()
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.boxes, b.boxes)
    assert np.array_equal(a.masks, b.masks)


def test_different_seeds_differ() -> None:
    a, b = generate_shapes(30, seed=0), generate_shapes(30, seed=1)
    assert not np.array_equal(a.boxes, b.boxes)
    per_image_equal = (a.images == b.images).all(axis=(1, 2, 3))
    assert not per_image_equal.any()


def test_images_within_a_set_differ() -> None:
    data = generate_shapes(50, seed=3)
    flat = data.images.reshape(50, -1)
    assert len(np.unique(flat, axis=0)) == 50


@pytest.mark.parametrize("n", [6, 61, 600])
def test_labels_are_balanced_and_shuffled(n: int) -> None:
    data = generate_shapes(n, size=8, seed=2)
    counts = np.bincount(data.labels, minlength=len(SHAPE_CLASSES))
    assert counts.max() - counts.min() <= 1
    if n >= 60:
        assert not np.array_equal(data.labels, np.arange(n) % len(SHAPE_CLASSES))


def test_class_subset_and_extra_classes() -> None:
    data = generate_shapes(20, classes=("star", "ring"), seed=0)
    assert data.class_names == ("star", "ring")
    assert set(data.labels.tolist()) == {0, 1}
    all_classes = SHAPE_CLASSES + EXTRA_SHAPE_CLASSES
    assert generate_shapes(16, classes=all_classes).labels.max() == len(all_classes) - 1


@pytest.mark.parametrize("size", [8, 16, 64])
def test_boxes_inside_image_and_tight_around_masks(size: int) -> None:
    classes = SHAPE_CLASSES + EXTRA_SHAPE_CLASSES
    data = generate_shapes(160, size=size, seed=4, classes=classes, return_masks=True)
    boxes, masks = data.boxes, data.masks
    assert masks is not None and masks.any(axis=(1, 2)).all(), "every image shows its shape"
    assert (boxes >= 0).all() and (boxes <= size).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # Every mask pixel centre lies inside the box ...
    _, rows, cols = np.nonzero(masks)
    index = np.nonzero(masks)[0]
    assert (cols + 0.5 >= boxes[index, 0]).all() and (cols + 0.5 <= boxes[index, 2]).all()
    assert (rows + 0.5 >= boxes[index, 1]).all() and (rows + 0.5 <= boxes[index, 3]).all()
    # ... and the box hugs the mask (sharp star and triangle tips miss pixel centres).
    assert np.abs(_mask_boxes(masks) - boxes).max() <= 1.5


def _object_border_gap(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, RGB distance between the mean object colour and the 2-px ring around it."""
    gaps = []
    for image, mask in zip(images.astype(np.float32), masks):
        grown = mask.copy()
        for shift in (-2, -1, 1, 2):
            grown |= np.roll(mask, shift, 0) | np.roll(mask, shift, 1)
        gaps.append(np.linalg.norm(image[mask].mean(0) - image[grown & ~mask].mean(0)))
    return np.array(gaps)


def test_masks_match_the_drawn_pixels() -> None:
    data = generate_shapes(60, size=32, seed=5, return_masks=True)
    assert data.masks is not None
    # The fill is kept >= 0.3 (of 1) away from the background, before lighting.
    assert (_object_border_gap(data.images, data.masks) > 20).all()


def test_domain_shift_keeps_geometry_and_changes_pixels() -> None:
    source = generate_shapes(120, size=32, seed=9, return_masks=True)
    shifted = generate_shapes(120, size=32, seed=9, return_masks=True,
                              domain=ShapesDomain.preset("shifted"))
    assert np.array_equal(source.labels, shifted.labels)
    assert np.array_equal(source.boxes, shifted.boxes)
    assert np.array_equal(source.masks, shifted.masks)
    assert not np.array_equal(source.images, shifted.images)
    src, dst = source.images.astype(np.float32), shifted.images.astype(np.float32)
    assert dst.mean() < 0.6 * src.mean()
    # Noise shows as pixel-to-pixel differences, relative to the image's brightness.
    def roughness(images: np.ndarray) -> float:
        return float(np.abs(np.diff(images, axis=2)).mean() / images.mean())

    assert roughness(dst) > 2 * roughness(src)


def test_single_domain_knobs() -> None:
    base = generate_shapes(40, seed=0, return_masks=True)
    dark = generate_shapes(40, seed=0, domain=ShapesDomain(lighting=0.25))
    assert dark.images.mean() < 0.35 * base.images.mean()
    blurred = generate_shapes(40, seed=0, domain=ShapesDomain(blur=1.5))
    edges = np.abs(np.diff(base.images.astype(np.float32), axis=1)).mean()
    assert np.abs(np.diff(blurred.images.astype(np.float32), axis=1)).mean() < 0.7 * edges
    cluttered = generate_shapes(40, seed=0, domain=ShapesDomain(clutter=1.0))
    assert not np.array_equal(cluttered.images, base.images)
    hidden = generate_shapes(40, seed=0, domain=ShapesDomain(contrast=0.0))
    assert base.masks is not None
    assert np.median(_object_border_gap(hidden.images, base.masks)) < 0.25 * np.median(
        _object_border_gap(base.images, base.masks))
    warm = generate_shapes(40, seed=0, domain=ShapesDomain(color_cast=(1.2, 1.0, 0.7)))
    red, blue = warm.images[..., 0].mean(), warm.images[..., 2].mean()
    assert red - blue > base.images[..., 0].mean() - base.images[..., 2].mean() + 10
    assert ShapesDomain.preset("source") == ShapesDomain()


@pytest.mark.parametrize("size", [8, 64])
def test_sizes(size: int) -> None:
    data = generate_shapes(12, size=size, seed=0)
    assert data.images.shape == (12, size, size, 3)
    assert data.images.std() > 10


def test_grayscale() -> None:
    gray = generate_shapes(10, channels=1, seed=0)
    rgb = generate_shapes(10, channels=3, seed=0)
    assert gray.images.shape == (10, 32, 32) and gray.images.dtype == np.uint8
    assert np.array_equal(gray.labels, rgb.labels) and np.array_equal(gray.boxes, rgb.boxes)
    luma = rgb.images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert np.abs(gray.images.astype(np.float32) - luma).max() <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"n": 0}, "n must be"),
        ({"n": 2.5}, "n must be an integer"),
        ({"n": 5, "size": 7}, "size must be"),
        ({"n": 5, "size": 2048}, "size must be"),
        ({"n": 5, "seed": -1}, "seed must be"),
        ({"n": 5, "channels": 2}, "channels must be 1 or 3"),
        ({"n": 5, "classes": ()}, "classes must be"),
        ({"n": 5, "classes": "circle"}, "classes must be"),
        ({"n": 5, "classes": ("circle", "circle")}, "duplicates"),
        ({"n": 5, "classes": ("circel",)}, "did you mean circle"),
        ({"n": 5, "domain": "shifted"}, "domain must be a ShapesDomain"),
    ],
)
def test_bad_arguments_raise_usage_error(kwargs: dict, fragment: str) -> None:
    n = kwargs.pop("n")
    with pytest.raises(UsageError, match=fragment) as info:
        generate_shapes(n, **kwargs)
    assert "\n" not in str(info.value)


def test_domain_validation_and_presets() -> None:
    with pytest.raises(UsageError, match="clutter"):
        ShapesDomain(clutter=1.5)
    with pytest.raises(UsageError, match="noise"):
        ShapesDomain(noise=-0.1)
    with pytest.raises(UsageError, match="color_cast"):
        ShapesDomain(color_cast=(1.0, 1.0))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="known presets: source, shifted"):
        ShapesDomain.preset("night")
    shifted = ShapesDomain.preset("shifted")
    assert shifted.lighting < 0.5 and shifted.noise > 0 and shifted.clutter > 0
    assert shifted.to_dict()["blur"] == shifted.blur


def _object_spectrum(images: np.ndarray) -> np.ndarray:
    """Label-free features: translation- and polarity-invariant spectrum of the object map.

    Raw pixels are a poor input for a shallow classifier here by design (random position,
    rotation, scale and fill/background polarity), so the learnability check first takes
    each pixel's colour distance from the image's median (background) colour, then the
    magnitude of its 2-D Fourier transform, which does not change when the shape moves.
    """
    pixels = images.astype(np.float32) / 255
    median = np.median(pixels.reshape(len(pixels), -1, 3), axis=1)[:, None, None, :]
    objectness = np.linalg.norm(pixels - median, axis=-1)
    objectness /= objectness.max(axis=(1, 2), keepdims=True) + 1e-6
    return np.log1p(np.abs(np.fft.rfft2(objectness))).reshape(len(pixels), -1)


def test_learnable_from_pixels_but_not_from_mean_colour() -> None:
    data = generate_shapes(1500, size=24, seed=11)
    train, test = slice(0, 1200), slice(1200, None)
    chance = 1 / len(data.class_names)
    features = _object_spectrum(data.images)
    shape_model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        shape_model.fit(features[train], data.labels[train])
    assert shape_model.score(features[test], data.labels[test]) > 1.5 * chance
    mean_rgb = data.images.reshape(1500, -1, 3).mean(axis=1) / 255
    colour_model = LogisticRegression(max_iter=500).fit(mean_rgb[train], data.labels[train])
    assert colour_model.score(mean_rgb[test], data.labels[test]) < 0.35
