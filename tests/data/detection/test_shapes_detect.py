"""builtin:shapes?task=detect: seeded, several shapes per image, tight boxes, same scenes across domains."""

from __future__ import annotations

import numpy as np
import pytest

from lensforge.data import load_table, open_source
from lensforge.data.preprocess import Preprocess
from lensforge.data.shapes import SHAPE_CLASSES, ShapesDomain
from lensforge.data.shapes_detect import MAX_OBJECTS, _draw_objects, generate_shapes_detect
from lensforge.errors import UsageError


def test_source_spec_recreates_it_and_classify_is_unchanged():
    source = open_source("builtin:shapes?task=detect&n=40&size=64&seed=3")
    assert source.task == "detection" and source.class_names == list(SHAPE_CLASSES)
    assert source.arrays.shape == (40, 64, 64, 3) and source.native_size == (64, 64)
    assert source.spec.startswith("builtin:shapes?task=detect&n=40&size=64&seed=3&")
    again = open_source(source.spec)
    assert again.arrays.tobytes() == source.arrays.tobytes()
    for a, b in zip(source.records, again.records):
        assert np.array_equal(a.target.boxes, b.target.boxes) and np.array_equal(a.target.labels, b.target.labels)
    assert open_source("builtin:shapes?task=detect&n=2").arrays.shape[1] == 128  # detection's default size
    classify = open_source("builtin:shapes?n=40&size=16&seed=3")
    assert classify.task == "classification" and classify.arrays.shape == (40, 16, 16, 3)
    assert open_source("builtin:shapes?task=classify&n=40&size=16&seed=3").arrays.tobytes() == classify.arrays.tobytes()
    with pytest.raises(UsageError, match="task='segment' must be classify or detect"):
        open_source("builtin:shapes?task=segment")
    with pytest.raises(UsageError, match="unknown option"):
        open_source("builtin:shapes?task=detect&colour=red")


def test_several_shapes_some_negatives_boxes_in_the_image():
    images, targets = generate_shapes_detect(400, size=64, seed=1)
    counts = np.array([len(t) for t in targets])
    assert counts.max() <= MAX_OBJECTS and 2.5 < counts.mean() < 4.0
    assert 0.02 < (counts == 0).mean() < 0.1  # ~5% negatives
    labels = np.concatenate([t.labels for t in targets])
    assert set(labels.tolist()) == set(range(len(SHAPE_CLASSES)))
    boxes = np.concatenate([t.boxes for t in targets])
    assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    assert ((boxes == 0) | (boxes == 64)).any()  # some shapes are cut by the border


def test_threads_do_not_change_the_result(monkeypatch):
    from lensforge.data import shapes_detect

    threaded = generate_shapes_detect(70, size=256, seed=9)  # 32 images a chunk: 3 chunks
    monkeypatch.setattr(shapes_detect.os, "cpu_count", lambda: 1)
    serial = generate_shapes_detect(70, size=256, seed=9)
    assert np.array_equal(threaded[0], serial[0])
    assert all(np.array_equal(a.boxes, b.boxes) for a, b in zip(threaded[1], serial[1]))


def test_domains_render_the_same_scenes():
    clean = generate_shapes_detect(30, size=48, seed=5)
    shifted = generate_shapes_detect(30, size=48, seed=5, domain=ShapesDomain.preset("shifted"))
    assert not np.array_equal(clean[0], shifted[0]) and clean[0].mean() > shifted[0].mean()
    for a, b in zip(clean[1], shifted[1]):
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)


def test_boxes_are_tight_around_the_drawn_pixels():
    """What a shape changes in its image lies in its box, and the last drawn shape fills its box to the edges."""
    n, size, seed = 60, 96, 7
    drawn, _ = generate_shapes_detect(n, size=size, seed=seed)
    hidden, targets = generate_shapes_detect(n, size=size, seed=seed, domain=ShapesDomain(contrast=0.0))
    changed = np.abs(drawn.astype(int) - hidden.astype(int)).max(axis=-1) > 8  # contrast 0 draws no shape
    _, image_of = _draw_objects(np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[0]), n, size)
    checked = 0
    for i, target in enumerate(targets):
        if len(target) == 0 or len(target) != (image_of == i).sum():
            continue  # a negative, or an image with a shape too hidden to be a target
        inside = np.zeros((size, size), dtype=bool)
        for x1, y1, x2, y2 in target.boxes:
            inside[max(int(y1) - 1, 0):int(np.ceil(y2)) + 1, max(int(x1) - 1, 0):int(np.ceil(x2)) + 1] = True
        assert not (changed[i] & ~inside).any()
        x1, y1, x2, y2 = target.boxes[-1]  # drawn last: nothing covers it
        region = changed[i, int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))]
        ys, xs = np.flatnonzero(region.any(axis=1)) + int(y1), np.flatnonzero(region.any(axis=0)) + int(x1)
        assert abs(xs[0] - x1) <= 1.5 and abs(xs[-1] + 1 - x2) <= 1.5, (i, target.boxes[-1], xs[[0, -1]])
        assert abs(ys[0] - y1) <= 1.5 and abs(ys[-1] + 1 - y2) <= 1.5, (i, target.boxes[-1], ys[[0, -1]])
        checked += 1
    assert checked > 20


def test_mostly_hidden_shapes_are_not_targets():
    n, size, seed = 300, 64, 2
    _, targets = generate_shapes_detect(n, size=size, seed=seed)
    _, image_of = _draw_objects(np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[0]), n, size)
    dropped = (image_of.size - sum(len(t) for t in targets)) / image_of.size
    assert 0 < dropped < 0.15


def test_load_table_letterboxes_the_boxes():
    source = open_source("builtin:shapes?task=detect&n=12&size=64&seed=0")
    table = load_table(source, Preprocess(input_size=(32, 32), fit="letterbox"), cache=False)
    assert table.images.shape == (12, 3, 32, 32)
    for record, target in zip(source.records, table.targets):
        np.testing.assert_allclose(target.boxes, record.target.boxes * 0.5, rtol=1e-6)
