"""Tiny synthetic detection data: coloured rectangles on noise (until builtin:shapes?task=detect lands)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from lensforge.data.sources import SampleRecord, Source
from lensforge.tasks.detection import BoxTarget

COLOURS = np.array([[230, 40, 40], [40, 220, 40], [50, 60, 235]], dtype=np.uint8)  # one class each


def rectangles_source(n: int = 200, size: int = 64, seed: int = 0, max_objects: int = 3) -> Source:
    """``n`` RGB images of ``size`` px, each with 0..max_objects filled rectangles of 3 colour classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (n, size, size, 3), dtype=np.uint8)
    records = []
    for i in range(n):
        boxes, labels = [], []
        for _ in range(rng.integers(0 if i % 10 == 0 else 1, max_objects + 1)):
            w, h = rng.integers(size // 6, size // 2, 2)
            x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
            label = int(rng.integers(0, len(COLOURS)))
            images[i, y0:y0 + h, x0:x0 + w] = COLOURS[label]
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        records.append(SampleRecord(BoxTarget(np.array(boxes, np.float32).reshape(-1, 4), labels),
                                    f"test:rectangles#{i}", None, i))
    return Source(f"test:rectangles?n={n}&size={size}&seed={seed}", "detection", ["red", "green", "blue"], records,
                  "RGB", images)


@pytest.fixture
def make_rectangles() -> Callable[..., Source]:
    return rectangles_source


@pytest.fixture
def rectangle_colours() -> np.ndarray:
    """(3, 3) uint8 RGB colour of each class of :func:`rectangles_source`."""
    return COLOURS
