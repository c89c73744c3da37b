"""The decoded-table cache: reused while nothing changed, decoded again when a file changes."""

from __future__ import annotations

import os

import numpy as np
from helpers import write_image_folder
from PIL import Image

from lensforge.data.preprocess import Preprocess
from lensforge.data.sources import open_source
from lensforge.data.table import load_table

PRE = Preprocess(input_size=(8, 8), channels=1, mean=(0.5,), std=(0.5,))


def test_the_same_folder_is_decoded_once(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=3, size=8)
    first = load_table(open_source(str(root)), PRE)
    assert load_table(open_source(str(root)), PRE) is first
    assert load_table(open_source(str(root)), PRE, cache=False) is not first
    other = Preprocess(input_size=(4, 4), channels=1, mean=(0.5,), std=(0.5,))
    assert load_table(open_source(str(root)), other).images.shape[-1] == 4


def test_a_changed_file_is_decoded_again(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=3, size=8)
    first = load_table(open_source(str(root)), PRE)
    path = sorted(root.rglob("*.png"))[0]
    Image.new("L", (8, 8), 7).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a clock tick later, whatever the FS
    second = load_table(open_source(str(root)), PRE)
    assert second is not first
    row = second.origins.index(str(path))
    assert np.all(second.images[row] == 7)


def test_builtin_sources_are_cached_by_spec():
    a = load_table(open_source("builtin:digits"), PRE)
    assert load_table(open_source("builtin:digits"), PRE) is a
