"""Selective prediction: answer only when confident, and know what that buys.

Confidence is the top softmax probability at the bundle's calibrated temperature (what
``predict`` reports). Accepting the images whose confidence is at least a threshold
trades *coverage* (share of images answered) for *selective risk* (error rate on the
answered ones); the risk-coverage curve sweeps the threshold, and AURC (Geifman et al.
2019) is the mean selective risk over coverages 1/n..n/n, lower is better.

The abstain threshold is chosen on validation data for a target risk: the lowest
threshold (largest coverage) whose selective risk is at most the target. By default the
target is **half the validation error rate, but not below 1%**. Halving adapts to the
model: a fixed target such as 1% alone is trivial for a strong model and unreachable
for a weak one (it would abstain on nearly everything), whereas halving always asks for
a real gain. The 1% floor stops it chasing a handful of images: below 1%, a typical
validation split holds only a few errors (digits: 2 in 269), and the threshold that
removes one of them is noise that can cost a quarter of the coverage (measured: 77%
coverage to go from 2 errors to 1). Pass ``target_risk`` for a stricter application.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lensforge.deploy.guardrails import max_softmax
from lensforge.errors import DataError, UsageError

CURVE_POINTS = 101  # points kept for the report's plot
MIN_DEFAULT_RISK = 0.01  # the default target (half the error) never goes below this


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Coverage, selective risk and threshold at each distinct confidence, from high to low.

    Images with equal confidence are accepted or rejected together, so each point is a
    threshold one could actually deploy. Coverage rises as the threshold falls.
    """
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    if confidence.shape != correct.shape or confidence.ndim != 1 or not len(confidence):
        raise DataError(f"risk-coverage needs equal, non-empty 1-d arrays (got {confidence.shape}, {correct.shape})")
    order = np.argsort(-confidence, kind="stable")
    sorted_conf, errors = confidence[order], np.cumsum(~correct[order])
    # the last index of each group of equal confidences
    ends = np.flatnonzero(np.r_[sorted_conf[1:] != sorted_conf[:-1], True])
    accepted = ends + 1
    return {"threshold": sorted_conf[ends], "coverage": accepted / len(confidence),
            "risk": errors[ends] / accepted}


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve: mean selective risk over coverages 1/n..n/n."""
    order = np.argsort(-np.asarray(confidence, np.float64), kind="stable")
    errors = np.cumsum(~np.asarray(correct, bool)[order])
    return float(np.mean(errors / np.arange(1, len(errors) + 1)))


def abstain_threshold(confidence: np.ndarray, correct: np.ndarray, target_risk: float) -> float:
    """The lowest confidence threshold whose selective risk is at most ``target_risk``.

    Returns 0.0 (never abstain) when even full coverage meets the target, and a value above
    every confidence (always abstain) when no threshold does.
    """
    if not 0 <= target_risk < 1:
        raise UsageError(f"target risk must be in [0, 1), not {target_risk}")
    curve = risk_coverage(confidence, correct)
    if curve["risk"][-1] <= target_risk:
        return 0.0
    ok = np.flatnonzero(curve["risk"] <= target_risk)
    if not len(ok):
        return float(np.nextafter(curve["threshold"][0], np.inf))
    return float(curve["threshold"][ok[-1]])


def fit_abstain(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    temperature: float = 1.0,
    target_risk: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Choose the abstain threshold on validation logits.

    Returns ``(manifest_entry, report)``: the manifest's ``guardrails.abstain`` entry
    (``threshold``, ``temperature``, ``target_risk``, and the validation coverage, risk
    and error it was chosen at) and the report's risk-coverage curve with AURC.
    """
    confidence = max_softmax(logits, temperature)
    correct = np.asarray(logits).argmax(1) == np.asarray(targets)
    error = float(1.0 - correct.mean())
    target = max(error / 2, MIN_DEFAULT_RISK) if target_risk is None else float(target_risk)
    threshold = abstain_threshold(confidence, correct, target)
    accepted = confidence >= threshold
    coverage = float(accepted.mean())
    risk = float((~correct[accepted]).mean()) if accepted.any() else 0.0
    entry = {"threshold": threshold, "temperature": float(temperature), "target_risk": target,
             "target": "half the validation error, at least 1%" if target_risk is None else "given",
             "validation": {"images": len(correct), "error": error, "coverage": coverage, "risk": risk}}
    curve = _thin(risk_coverage(confidence, correct))
    return entry, {"aurc": aurc(confidence, correct), "error": error, "curve": curve}


def _thin(curve: dict[str, np.ndarray], points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """At most ``points`` evenly spaced points of the curve (always the first and last), as lists."""
    n = len(curve["coverage"])
    keep = np.unique(np.linspace(0, n - 1, min(n, points)).round().astype(int))
    return {name: values[keep].astype(float).tolist() for name, values in curve.items()}
