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

    def describe_metric(self, value: float, split: str) -> str:
        return f"{split} acc {value:.2%}"

    def predict_batch(self, bundle: Any, pixels: np.ndarray, sizes: Sequence[tuple[int, int]], *,
                      guardrails: Any = None, top_k: int = 5) -> list[dict[str, Any]]:
        logits, features = bundle.predict_uint8(pixels)
        probs = softmax(logits, bundle.temperature)
        rows = [classification_row(p, bundle.class_names, top_k) for p in probs]
        if guardrails is not None:
            for row, check in zip(rows, guardrails.check(logits, features, pixels, list(sizes))):
                row.update(check)
        return rows


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (stable for large logits)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def classification_row(probs: np.ndarray, class_names: Sequence[str], top_k: int) -> dict[str, Any]:
    """The prediction of one image from its calibrated probabilities: what ``predict`` and the server answer.

    ``{"label", "class_index", "confidence", "top_k": [{"label", "prob"}]}``, ``top_k`` highest first
    (ties in class order).
    """
    order = np.argsort(-probs, kind="stable")[: min(top_k, len(probs))]
    best = int(order[0])
    return {
        "label": class_names[best],
        "class_index": best,
        "confidence": float(probs[best]),
        "top_k": [{"label": class_names[int(i)], "prob": float(probs[i])} for i in order],
    }


CLASSIFICATION = register_task(Classification())
