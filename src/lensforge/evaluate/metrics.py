"""Classification metrics from logits: torchmetrics for the numbers, NumPy for the plots' data."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

ECE_BINS = 15  # the usual choice in the calibration literature (Guo et al. 2017)
WORST_CLASSES = 5
# A model "learned something" when its accuracy beats always answering the most frequent class
# by more than this many binomial standard errors (one-sided 99%); below it, it is at chance level.
CHANCE_Z = 2.33


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count, for the reliability diagram."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    out: dict[str, list[float]] = {"bin_lower": edges[:-1].tolist(), "bin_upper": edges[1:].tolist(),
                                   "confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        out["count"].append(count)
        out["confidence"].append(float(confidence[mask].mean()) if count else None)
        out["accuracy"].append(float(correct[mask].mean()) if count else None)
    return out


def classification_metrics(logits: np.ndarray, targets: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, ECE, per-class precision/recall/F1, confusion matrix and reliability bins."""
    k = len(class_names)
    probs = torch.softmax(torch.from_numpy(logits.astype(np.float32)), dim=1)
    y = torch.from_numpy(targets.astype(np.int64))
    precision = MulticlassPrecision(k, average=None, zero_division=0)(probs, y).numpy()
    recall = MulticlassRecall(k, average=None, zero_division=0)(probs, y).numpy()
    f1 = MulticlassF1Score(k, average=None, zero_division=0)(probs, y).numpy()
    support = np.bincount(targets, minlength=k)
    per_class = [{"name": name, "precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i]), "support": int(support[i])} for i, name in enumerate(class_names)]
    present = [c for c in per_class if c["support"] > 0]
    worst = sorted(present, key=lambda c: (c["recall"], c["f1"]))[:WORST_CLASSES]
    confidence, predicted = probs.max(1)
    accuracy = float(MulticlassAccuracy(k, average="micro")(probs, y))
    return {
        "num_samples": len(targets),
        "accuracy": accuracy,
        "macro_f1": float(np.mean([c["f1"] for c in present])) if present else 0.0,
        "ece": float(MulticlassCalibrationError(k, n_bins=ECE_BINS, norm="l1")(probs, y)),
        "nll": float(torch.nn.functional.cross_entropy(torch.from_numpy(logits.astype(np.float32)), y)),
        "per_class": per_class,
        "confusion": MulticlassConfusionMatrix(k)(probs, y).numpy().astype(int).tolist(),
        "worst_classes": [{"name": c["name"], "recall": c["recall"], "f1": c["f1"]} for c in worst],
        "reliability": reliability_bins(confidence.numpy(), (predicted == y).numpy().astype(float)),
        **chance_level(targets, k, accuracy),
    }


def chance_level(targets: np.ndarray, num_classes: int, accuracy: float) -> dict[str, Any]:
    """``{"chance_accuracy", "at_chance"}``: the majority-class rate and whether ``accuracy`` fails to beat it.

    The majority rate is what a model that ignores its input scores (1/K on balanced data);
    ``at_chance`` is true when ``accuracy`` is within ``CHANCE_Z`` binomial standard errors of it.
    """
    n = len(targets)
    if n == 0:
        return {"chance_accuracy": None, "at_chance": False}
    majority = float(np.bincount(targets, minlength=num_classes).max() / n)
    margin = CHANCE_Z * float(np.sqrt(majority * (1 - majority) / n))
    return {"chance_accuracy": majority, "at_chance": bool(accuracy <= majority + margin)}


def chance_message(metrics: dict[str, Any], what: str) -> str:
    """One line saying ``what`` scored at chance level, with the numbers."""
    return (f"{what} scores {metrics['accuracy']:.1%} on {metrics.get('num_samples', '?')} images, no better than "
            f"always answering the most frequent class ({metrics['chance_accuracy']:.1%}): it learned nothing usable")


def confident_mistakes(logits: np.ndarray, targets: np.ndarray, limit: int = 16) -> list[tuple[int, int, float]]:
    """(index, predicted class, confidence) of the most confident wrong predictions."""
    probs = torch.softmax(torch.from_numpy(logits.astype(np.float32)), dim=1).numpy()
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != targets)
    ranked = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:limit]
    return [(int(i), int(predicted[i]), float(probs[i, predicted[i]])) for i in ranked]
