from __future__ import annotations

import json

import numpy as np

from lensforge.data import load_table, make_splits, open_source
from lensforge.data.preprocess import Preprocess
from lensforge.data.splits import load_splits


def _digits():
    return load_table(open_source("builtin:digits"), Preprocess((8, 8), 1, (0.5,), (0.5,)))


def test_stratified_seeded_disjoint():
    table = _digits()
    a, b, c = make_splits(table, seed=1), make_splits(table, seed=1), make_splits(table, seed=2)
    assert np.array_equal(a.test, b.test) and not np.array_equal(a.test, c.test)
    parts = [set(a.train), set(a.val), set(a.test)]
    assert sum(map(len, parts)) == len(table) and not (parts[0] & parts[1] or parts[0] & parts[2])
    for split in (a.val, a.test):  # stratified: every class near its share
        share = np.bincount(table.targets[split], minlength=10) / len(split)
        assert np.abs(share - 0.1).max() < 0.02
    assert 0.13 < len(a.test) / len(table) < 0.17


def test_split_file_round_trip(tmp_path):
    table = _digits()
    splits = make_splits(table, seed=5)
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(splits.to_json(table)))
    again = load_splits(path, table)
    assert all(np.array_equal(np.sort(again.get(s)), np.sort(splits.get(s))) for s in ("train", "val", "test"))
