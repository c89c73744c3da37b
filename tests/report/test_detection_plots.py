"""Detection figures render to PNG, including with nothing to draw."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lensforge.report import detection_plots


def png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as image:
        image.verify()
        return image.size


def test_precision_recall_curves_render_with_and_without_classes() -> None:
    recall = np.array([0.25, 0.5, 0.5, 0.75, 1.0])
    precision = np.array([1.0, 1.0, 0.67, 0.75, 0.6])
    curves = {"cat": (recall, precision), "dog": (recall[:2], precision[:2]), "empty": (np.zeros(0), np.zeros(0))}
    width, height = png_size(detection_plots.precision_recall_curves(curves, {"cat": 0.81, "dog": None}))
    assert width > 500 and height > 400
    png_size(detection_plots.precision_recall_curves({}))
    many = {f"class_{i}": (recall, precision) for i in range(25)}
    png_size(detection_plots.precision_recall_curves(many))


def test_confusion_matrix_has_a_background_row_and_column() -> None:
    matrix = np.array([[5, 1, 2], [0, 7, 1], [3, 2, 0]])
    assert png_size(detection_plots.detection_confusion_matrix(matrix, ["cat", "dog"]))[0] > 300
    with pytest.raises(ValueError, match="background last"):
        detection_plots.detection_confusion_matrix(matrix[:2, :2], ["cat", "dog"])


@pytest.mark.parametrize("channels", [1, 3])
def test_error_gallery_draws_boxes_and_empty_images(channels: int) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(channels, 48, 64), dtype=np.uint8) for _ in range(5)]
    boxes = np.array([[4, 4, 20, 30]], dtype=np.float32)
    none = np.zeros((0, 4), dtype=np.float32)
    png = detection_plots.error_gallery(images, [boxes, none, none, boxes, none], [none, boxes, none, boxes, none],
                                        [none, none, boxes, boxes, none],
                                        titles=[f"#{i}" for i in range(5)], columns=3)
    width, height = png_size(png)
    assert width > 500 and height > 200
    plain = detection_plots.error_gallery(images[:1], [none], [none], [none])
    assert png_size(plain)[0] > 500
    assert png != plain


def test_error_gallery_without_images_and_with_bad_input() -> None:
    png_size(detection_plots.error_gallery([], [], [], []))
    with pytest.raises(ValueError, match="box lists"):
        detection_plots.error_gallery([np.zeros((3, 8, 8), np.uint8)], [], [], [])
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        none = np.zeros((0, 4))
        detection_plots.error_gallery([np.zeros((8, 8, 3), np.uint8)], [none], [none], [none])
