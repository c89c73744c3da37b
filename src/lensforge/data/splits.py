"""Train/val/test splits: the source's own when it has them, else stratified and seeded.

The split used is written into the run (``splits.json``, by origin) and can be
read back to reproduce it exactly.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from lensforge.data.table import ImageTable
from lensforge.errors import DataError
from lensforge.tasks import get_task

MIN_PER_CLASS = 2  # a class needs at least this many images to appear in train and in a held-out split


@dataclass(frozen=True)
class Splits:
    """Index arrays into an :class:`ImageTable`."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int
    how: str  # "given", "stratified" or "file"

    def get(self, name: str) -> np.ndarray:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r} (use train, val or test)")
        return getattr(self, name)

    def to_json(self, table: ImageTable) -> dict[str, Any]:
        return {"seed": self.seed, "how": self.how,
                "sizes": {s: len(self.get(s)) for s in ("train", "val", "test")},
                **{s: [table.origins[i] for i in self.get(s)] for s in ("train", "val", "test")}}


def stratify_keys(table: ImageTable) -> np.ndarray:
    """One class per image to stratify on (the class itself, or e.g. a detection image's class)."""
    if table.targets.dtype != object:
        return table.targets
    task = get_task(table.task)
    return np.array([task.stratify_key(t) for t in table.targets], dtype=np.int64)


def _check_class_sizes(table: ImageTable, indices: np.ndarray) -> None:
    if table.targets.dtype == object:
        return  # detection images hold several classes: a class seen once still trains
    counts = Counter(int(t) for t in table.targets[indices])
    for cls, name in enumerate(table.class_names):
        if counts.get(cls, 0) == 1:
            raise DataError(f"class '{name}' has a single image: need at least {MIN_PER_CLASS} "
                            "per class to split into train and held-out sets")


def _stratified(indices: np.ndarray, targets: np.ndarray, fraction: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, held) with ``fraction`` held, stratified where possible."""
    if fraction <= 0 or len(indices) < 2:
        return indices, indices[:0]
    n_held = max(1, round(len(indices) * fraction))
    labels = targets[indices]
    n_classes = len(set(labels.tolist()))
    strat = labels if (min(Counter(labels.tolist()).values()) >= 2
                       and n_held >= n_classes and len(indices) - n_held >= n_classes) else None
    rest, held = train_test_split(indices, test_size=n_held, random_state=seed, stratify=strat)
    return np.sort(rest), np.sort(held)


def make_splits(table: ImageTable, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0) -> Splits:
    """Use the source's splits where given; carve missing val/test from train, stratified."""
    all_idx = np.arange(len(table))
    keys = stratify_keys(table)
    fixed = np.array([s or "" for s in table.fixed_splits])
    if (fixed == "").all():
        _check_class_sizes(table, all_idx)
        rest, test = _stratified(all_idx, keys, test_fraction, seed)
        train, val = _stratified(rest, keys, val_fraction / max(1e-9, 1 - test_fraction), seed + 1)
        return Splits(train, val, test, seed, "stratified")
    if (fixed == "").any():
        raise DataError("some samples have a split and others do not: give a split for every row or none")
    train, val, test = (np.flatnonzero(fixed == s) for s in ("train", "val", "test"))
    if len(train) == 0:
        raise DataError("the data's own splits have no 'train' samples")
    _check_class_sizes(table, train)
    if len(val) == 0:
        train, val = _stratified(train, keys, val_fraction, seed + 1)
    if len(test) == 0:
        train, test = _stratified(train, keys, test_fraction, seed + 2)
    return Splits(train, val, test, seed, "given")


def load_splits(path: str | Path, table: ImageTable) -> Splits:
    """Reproduce a split written by :meth:`Splits.to_json` (matched by origin)."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"splits file '{path}' cannot be read: {e}") from None
    where = {origin: i for i, origin in enumerate(table.origins)}
    parts = []
    for name in ("train", "val", "test"):
        missing = [o for o in saved.get(name, []) if o not in where]
        if missing:
            raise DataError(f"splits file '{path}': {len(missing)} {name} samples are not in the data "
                            f"(e.g. {missing[0]})")
        parts.append(np.array([where[o] for o in saved.get(name, [])], dtype=np.int64))
    return Splits(*parts, seed=int(saved.get("seed", 0)), how="file")
