"""Task registry: what a target is, and how targets are batched and stratified.

Image classification is the only task built now; detection and segmentation
register here later with their own target kinds (boxes, masks) and reuse the
same sources, runs and bundles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lensforge.registry import Registry


@dataclass(frozen=True)
class Task:
    """How one task's targets behave.

    Attributes:
        name: registry name, written into runs and bundles.
        target_kind: "class_index" now; later e.g. "boxes", "mask".
        stratify: whether splits can be stratified by :meth:`stratify_key`.
    """

    name: str
    target_kind: str
    stratify: bool = True

    def collate(self, targets: Sequence[Any]) -> np.ndarray:
        return np.asarray(targets, dtype=np.int64)

    def stratify_key(self, target: Any) -> Any:
        return int(target)


TASKS: Registry[Task] = Registry("task")
TASKS.register("classification")(Task("classification", "class_index"))


def get_task(name: str) -> Task:
    return TASKS.get(name)
