"""Report plots render for awkward inputs; formatting turns missing values into a dash."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from lensforge.report import formatting, plots


def png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(png)).size


@pytest.mark.parametrize("classes", [2, 30])
def test_confusion_matrix_renders_small_and_large(classes: int) -> None:
    confusion = np.eye(classes, dtype=int) * 20 + 1
    names = [f"class_with_a_long_name_{i}" for i in range(classes)]
    width, height = png_size(plots.confusion_matrix(confusion.tolist(), names))
    assert 300 < width <= plots.WIDTH_IN * plots.DPI + 1 and height > 300


def test_confusion_matrix_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError):
        plots.confusion_matrix([[1, 2], [3]], ["a", "b"])


def test_learning_curves_survive_missing_columns() -> None:
    rows = [{"epoch": e, "train_loss": 1 / e, "lr": None} for e in range(1, 4)]
    assert png_size(plots.learning_curves(rows, best_epoch=None))[0] > 700


def test_grad_norms_handle_zero_and_missing_values() -> None:
    history = {"step": [0, 1, 2], "total": [1.0, 0.0, None],
               "layers": {f"block{i}": [1e-3, 0.0, None] for i in range(20)}}
    events = [{"step": 1, "kind": "vanishing"}, {"step": None, "kind": "odd"}]
    assert png_size(plots.grad_norms(history, events))[0] > 700


def test_reliability_rejects_mismatched_bins() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        plots.reliability_diagram({"bin_lower": [0.0], "bin_upper": [0.5, 1.0]}, 0.1)


def test_thumbnail_enlarges_with_nearest_neighbour_and_shrinks_large() -> None:
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    big = np.asarray(Image.open(io.BytesIO(plots.thumbnail(buffer.getvalue()))))
    assert big.shape == (96, 96)
    assert (big[:12, :12] == pixels[0, 0]).all() and (big[-12:, -12:] == pixels[7, 7]).all()

    buffer = io.BytesIO()
    Image.new("RGB", (640, 320)).save(buffer, format="PNG")
    assert png_size(plots.thumbnail(buffer.getvalue())) == (128, 64)


@pytest.mark.parametrize("helper", [formatting.fmt_number, formatting.fmt_percent,
                                    formatting.fmt_sci, formatting.fmt_int, formatting.fmt_count,
                                    formatting.fmt_bytes, formatting.fmt_seconds,
                                    formatting.fmt_date, formatting.fmt_text])
@pytest.mark.parametrize("missing", [None, math.nan, math.inf, ""])
def test_missing_values_format_as_dash(helper, missing) -> None:
    assert helper(missing) == formatting.MISSING


@pytest.mark.parametrize(("helper", "value", "text"), [
    (formatting.fmt_percent, 0.9234, "92.3%"),
    (formatting.fmt_sci, 3.2e-07, "3.2e-07"),
    (formatting.fmt_sci, 1e-4, "1e-04"),
    (formatting.fmt_sci, 0.5, "0.5"),
    (formatting.fmt_int, 12345.0, "12,345"),
    (formatting.fmt_count, 1_234_567, "1.23 M"),
    (formatting.fmt_bytes, 315_221, "315.2 kB"),
    (formatting.fmt_seconds, 83.4, "1 min 23 s"),
    (formatting.fmt_seconds, 3725, "1 h 02 min"),
    (formatting.fmt_date, "2024-05-01T14:03:22+02:00", "2024-05-01 14:03 UTC+02:00"),
    (formatting.fmt_text, [0.5, 0.25], "0.5, 0.25"),
])
def test_formatting(helper, value, text) -> None:
    assert helper(value) == text
