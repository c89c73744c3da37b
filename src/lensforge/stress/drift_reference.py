"""Drift reference: how a bundle's inputs and predictions look on held-out data.

Fitted by :func:`lensforge.stress.ood.fit_guardrails` on the *validation* split, so it
describes held-out behaviour, and stored JSON-friendly in the manifest under
``guardrails["drift"]`` (a few tens of KB at most), where
:class:`lensforge.serve.drift.DriftMonitor` reads it; the serving side computes the same
statistics with the same code (:func:`lensforge.deploy.drift.input_statistics`).

Per input statistic: a histogram over quantile bins of the reference (at most 10, and at
most one per 25 reference images so PSI's noise floor stays below its warning level, see
:mod:`lensforge.serve.drift`) and the sorted sample for KS, thinned to
:data:`KS_SAMPLE_SIZE` evenly spaced order statistics when validation is larger. Then the
predicted-class proportions (in at most 20 contiguous class groups of similar mass), a
histogram of the calibrated confidence (top softmax probability at the bundle's
temperature) and the OOD flag rate at the shipped threshold. Input statistics come
rounded to 5 significant digits (on both sides, so ties stay ties) and bin cuts are rounded
the same way, to keep the manifest small; bin proportions are computed with the rounded
cuts, so they stay exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lensforge.deploy.drift import (
    ClassHistogram,
    DriftReference,
    DriftThresholds,
    Histogram,
    input_statistics,
    round_significant,
)
from lensforge.deploy.guardrails import max_softmax

MIN_REFERENCE_IMAGES = 100  # fewer, and the reference alone makes PSI noisy enough to alarm
MAX_BINS = 10  # per statistic: deciles
REFERENCE_PER_BIN = 25  # reference images per bin at least (PSI's noise grows with bins / images)
MAX_CLASS_GROUPS = 20
KS_SAMPLE_SIZE = 500  # reference values kept per statistic for KS (<= 1000; 7 statistics x 500 ~ 30 KB)
_CHUNK = 256  # images per vectorised statistics step (each makes a float32 copy)


def fit_histogram(values: np.ndarray, bins: int) -> Histogram:
    """Quantile bins of the finite ``values``; every finite bin holds some reference value.

    Cuts are reference values (``inverted_cdf`` quantiles), bins are closed on the right and
    a cut at the maximum is dropped, so ties (e.g. a statistic that is mostly 0) merge bins
    instead of leaving empty ones.
    """
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    cuts = np.empty(0)
    if len(finite):
        quantiles = np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1], method="inverted_cdf")
        cuts = np.unique(round_significant(quantiles))
        cuts = cuts[cuts < finite.max()]
    partial = Histogram(cuts, np.zeros(len(cuts) + 2))
    return Histogram(cuts, partial.of(values))


def ks_sample(values: np.ndarray, size: int = KS_SAMPLE_SIZE) -> np.ndarray:
    """Sorted finite values, thinned to ``size`` evenly spaced order statistics (the ECDF's shape)."""
    finite = np.sort(np.asarray(values, np.float64)[np.isfinite(values)])
    if len(finite) > size:
        finite = finite[np.round(np.linspace(0, len(finite) - 1, size)).astype(np.int64)]
    return finite  # already rounded by input_statistics


def class_histogram(classes: np.ndarray, num_classes: int, groups: int) -> ClassHistogram:
    """Predicted-class proportions in at most ``groups`` contiguous class groups of similar reference mass."""
    counts = np.bincount(classes, minlength=num_classes).astype(np.float64)
    if num_classes <= groups:
        edges = np.arange(num_classes + 1)
    else:
        cumulative = np.cumsum(counts) / counts.sum()
        inner = np.searchsorted(cumulative, np.arange(1, groups) / groups, "left") + 1
        edges = np.unique(np.clip(np.r_[0, inner, num_classes], 0, num_classes))
    partial = ClassHistogram(edges, np.zeros(len(edges) - 1))
    return ClassHistogram(edges, partial.of(classes))


def _statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    parts = [input_statistics(images[i:i + _CHUNK]) for i in range(0, len(images), _CHUNK)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def fit_drift_reference(
    images: np.ndarray,
    logits: np.ndarray,
    *,
    temperature: float = 1.0,
    ood_flags: np.ndarray | None = None,
    fitted_on: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The manifest entry ``guardrails["drift"]`` from held-out images and the bundle's logits on them.

    Args:
        images: uint8 (N, C, H, W) model inputs (the validation split).
        logits: (N, K) the bundle's logits on them.
        temperature: the bundle's, for the confidences.
        ood_flags: (N,) whether the shipped OOD detector flags each image; None without one.
        fitted_on: recorded as is (data, split).

    Returns:
        Plain JSON, or None for fewer than :data:`MIN_REFERENCE_IMAGES` images.
    """
    n = len(images)
    if n < MIN_REFERENCE_IMAGES:
        return None
    logits = np.asarray(logits, np.float64)
    if logits.shape[0] != n or (ood_flags is not None and len(ood_flags) != n):
        raise ValueError(f"{n} images but logits {logits.shape} and OOD flags {np.shape(ood_flags)}")
    bins = min(MAX_BINS, n // REFERENCE_PER_BIN)
    groups = min(MAX_CLASS_GROUPS, n // REFERENCE_PER_BIN)
    stats = _statistics(images)
    reference = DriftReference(
        statistics={name: fit_histogram(values, bins) for name, values in stats.items()},
        samples={name: ks_sample(values) for name, values in stats.items()},
        predicted_class=class_histogram(logits.argmax(1), logits.shape[1], groups),
        confidence=fit_histogram(max_softmax(logits, temperature), bins),
        ood_rate=None if ood_flags is None else float(np.mean(ood_flags)),
        images=n, temperature=float(temperature), thresholds=DriftThresholds(),
        fitted_on={"split": "val", "images": n, **(fitted_on or {})},
    )
    return reference.to_dict()
