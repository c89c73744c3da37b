"""Image classification: one class index per image (torch-free half)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lensforge.tasks import Task, register_task


class Classification(Task):
    name = "classification"
    target_kind = "class_index"
    primary_metric = "acc"
    torch_module = "lensforge.tasks.torch_classification"

    def collate(self, targets: Sequence[Any]) -> np.ndarray:
        return np.asarray(targets, dtype=np.int64)

    def stratify_key(self, target: Any) -> int:
        return int(target)


CLASSIFICATION = register_task(Classification())
