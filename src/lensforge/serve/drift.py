"""Drift monitoring while serving: do recent inputs and predictions still look like validation's? (NumPy only)

A guarded bundle carries a drift reference in its manifest, ``guardrails["drift"]``,
fitted by :func:`lensforge.stress.drift_reference.fit_drift_reference` on the
*validation* split (held-out behaviour, not the training fit). :class:`DriftMonitor`
keeps the last ``window`` served images as small records (input statistics, predicted
class, calibrated confidence, OOD flag) in a ring buffer and compares that window with
the reference in O(window) NumPy, cheap enough to run on every metrics scrape:

- **PSI** (population stability index) over the reference's quantile bins of every input
  statistic, of the confidence, and over the predicted classes (contiguous class groups
  of similar reference mass when there are many classes): ``sum((a - e) * ln(a / e))``,
  proportions floored at :data:`PSI_FLOOR` so an empty bin stays finite. Rule of thumb:
  below 0.1 no real shift, 0.1-0.25 moderate (warning), 0.25 and above significant (alarm)
  (Siddiqi, *Credit Risk Scorecards*, Wiley 2006; the scale is the credit-scoring industry's).
  Under no drift PSI is about a chi-square with B - 1 degrees of freedom times
  (1/n + 1/N) (Yurdakul, *Statistical Properties of Population Stability Index*, PhD
  thesis, Western Michigan University 2018): with B = 10 bins and N = 360 reference images
  its mean is 0.07 at n = 200 window images, and an alarm by chance has p ~ 1e-3. That is
  why there is no verdict below ``min_observed`` images and the fit caps bins at one per
  25 reference images.
- **KS**, the two-sample Kolmogorov-Smirnov test of each input statistic against the
  reference's sorted sample. The p-value is the limiting Kolmogorov distribution at
  ``(sqrt(en) + 0.12 + 0.11 / sqrt(en)) * D`` with ``en = n m / (n + m)`` (Stephens 1970,
  the form of Numerical Recipes' ``probks``); it is within 0.02 of SciPy's
  ``ks_2samp(method="asymp")``, which evaluates the finite-n one-sample distribution
  instead, and SciPy is not needed here. Alarm when p < 0.01 / (number of statistics)
  (Bonferroni: 1% family-wise). With a large window KS flags even harmless shifts; PSI
  says how large they are.
- **OOD rate**: the share of window images the bundle's OOD detector flags, against the
  reference rate p0 on validation (at most 5%: the threshold keeps 95% of validation).
  One-sided two-proportion z-test, normal approximation, pooled rate p:
  ``z = (rate - p0) / sqrt(p (1 - p) (1/n + 1/N))`` (the reference rate is measured on N
  images, and the threshold was chosen on them); alarm when z > 4 (a chance alarm about
  once in 30,000 evaluations without drift). With p0 = 5% that is a window rate above
  14% for N = 270 reference and n = 1000 window images, above 9% for N = 2000.

The window is assumed to be a mixed sample of traffic: a stream sorted by class looks
like drift in the predicted classes, and is.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lensforge.deploy.drift import (
    DRIFT_KEY,
    MIN_OBSERVED,
    DriftReference,
    DriftThresholds,
    input_statistics,
    ks_2samp,
    psi,
)
from lensforge.deploy.guardrails import GUARDRAILS_KEY
from lensforge.errors import UsageError

DEFAULT_WINDOW = 1000  # images in the sliding window
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")  # characters a Prometheus label cannot hold
_VERDICT_EVERY = 20  # update() re-evaluates the verdict after window / 20 new images

logger = logging.getLogger("lensforge.serve.drift")


# ---------------------------------------------------------------------------- scores of a window


@dataclass(frozen=True)
class Records:
    """Per-image records of a window (rows in no particular order)."""

    stats: np.ndarray  # (n, S) float64, columns in the reference's statistic order
    classes: np.ndarray  # (n,) int64
    confidence: np.ndarray  # (n,) float64
    ood: np.ndarray  # (n,) float64: 1 flagged, 0 not, NaN unknown


def window_scores(reference: DriftReference, records: Records) -> dict[str, float]:
    """PSI, KS and OOD-rate scores of ``records`` against ``reference`` (empty for no records)."""
    if not len(records.classes):
        return {}
    scores: dict[str, float] = {}
    for column, (name, hist) in enumerate(reference.statistics.items()):
        scores[f"psi_{name}"] = psi(hist.proportions, hist.of(records.stats[:, column]))
    for column, name in enumerate(reference.statistics):
        values = records.stats[:, column]
        values, sample = values[np.isfinite(values)], reference.samples[name]
        if len(values) and len(sample):  # a window of flat images has no finite sharpness: PSI sees it
            scores[f"ks_{name}"], scores[f"ks_p_{name}"] = ks_2samp(values, sample)
    scores["psi_predicted_class"] = psi(reference.predicted_class.proportions,
                                        reference.predicted_class.of(records.classes))
    scores["psi_confidence"] = psi(reference.confidence.proportions, reference.confidence.of(records.confidence))
    known = records.ood[~np.isnan(records.ood)]
    if reference.ood_rate is not None and len(known):
        scores["ood_rate"] = float(known.mean())
        scores["ood_rate_reference"] = reference.ood_rate
        scores["ood_rate_z"] = ood_rate_z(float(known.mean()), len(known), reference.ood_rate, reference.images)
    return scores


def ood_rate_z(rate: float, n: int, reference_rate: float, reference_images: int) -> float:
    """z of the two-proportion test (pooled) of the window's OOD rate against the reference's.

    The reference rate is itself a measurement on ``reference_images`` images (and the
    threshold was set on them), so its uncertainty counts too; the pooled rate is floored
    at one image in the reference so a reference rate of 0 does not make any flag an alarm.
    """
    pooled = (rate * n + reference_rate * reference_images) / (n + reference_images)
    pooled = min(max(pooled, 1.0 / max(reference_images, 1)), 0.5)
    return (rate - reference_rate) / math.sqrt(pooled * (1.0 - pooled) * (1.0 / n + 1.0 / max(reference_images, 1)))


def verdict(scores: Mapping[str, float], thresholds: DriftThresholds) -> tuple[list[str], list[str]]:
    """(alarms, warnings): names of the scores past their thresholds."""
    alarms, warnings = [], []
    ks_names = [name for name in scores if name.startswith("ks_p_")]
    for name, value in scores.items():
        if name.startswith("psi_"):
            if value >= thresholds.psi_alarm:
                alarms.append(name)
            elif value >= thresholds.psi_warn:
                warnings.append(name)
        elif name in ks_names and value < thresholds.ks_p_value_alarm / len(ks_names):
            alarms.append(name)
    if scores.get("ood_rate_z", -math.inf) > thresholds.ood_rate_z_alarm:
        alarms.append("ood_rate")
    return alarms, warnings


# ---------------------------------------------------------------------------- the monitor


class DriftMonitor:
    """A sliding window of served images compared with the bundle's drift reference; thread-safe."""

    def __init__(self, reference: DriftReference, window: int = DEFAULT_WINDOW, *,
                 min_observed: int | None = None) -> None:
        if not isinstance(window, (int, np.integer)) or window < 1:
            raise UsageError(f"drift window must be a positive number of images, not {window!r}")
        self.reference = reference
        self.window = int(window)
        self.min_observed = min(window, MIN_OBSERVED if min_observed is None else max(1, int(min_observed)))
        self._names = list(reference.statistics)
        self._stats = np.full((window, len(self._names)), np.nan)
        self._classes = np.zeros(window, np.int64)
        self._confidence = np.zeros(window)
        self._ood = np.full(window, np.nan)
        self._next = 0  # ring position of the next record
        self._observed = 0
        self._total_seen = 0
        self._since_verdict = 0
        self._verdict_every = max(1, window // _VERDICT_EVERY)
        self._drifting = False
        self._judged_at = -1  # total_seen of the newest verdict, so an older snapshot cannot undo it
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle: Any, window: int = DEFAULT_WINDOW, *,
                    min_observed: int | None = None) -> DriftMonitor | None:
        """The monitor of a bundle's drift reference, or None when the bundle has none."""
        guardrails = bundle.manifest.get(GUARDRAILS_KEY)
        if not isinstance(guardrails, Mapping) or guardrails.get(DRIFT_KEY) is None:
            return None
        reference = DriftReference.from_dict(guardrails[DRIFT_KEY], f"bundle {bundle.path}")
        temperature = getattr(bundle, "temperature", reference.temperature)
        if not math.isclose(temperature, reference.temperature, rel_tol=1e-6):
            logger.info("bundle %s: temperature %.4g differs from the drift reference's %.4g (recalibrated "
                        "after guarding): confidence PSI compares different scales", bundle.path, temperature,
                        reference.temperature)
        return cls(reference, window, min_observed=min_observed)

    def update(self, images_uint8: np.ndarray, probs: np.ndarray, ood: np.ndarray | None = None) -> None:
        """Add served images: uint8 (N, C, H, W) at the model input, calibrated probs (N, K), OOD flags (N,)."""
        images, probs = np.asarray(images_uint8), np.asarray(probs, np.float64)
        n = len(images)
        if images.ndim != 4 or probs.shape != (n, self.reference.predicted_class.num_classes):
            raise UsageError(f"drift update needs images (N, C, H, W) and probs (N, "
                             f"{self.reference.predicted_class.num_classes}), got {images.shape} and {probs.shape}")
        if ood is not None and np.shape(ood) != (n,):
            raise UsageError(f"drift update needs OOD flags of shape ({n},), got {np.shape(ood)}")
        if not n:
            return
        stats = input_statistics(images)
        missing = [name for name in self._names if name not in stats]
        if missing:
            raise UsageError(f"drift update: images of {images.shape[1]} channels lack {', '.join(missing)} "
                             "of the reference: pass the model inputs")
        rows = np.column_stack([stats[name] for name in self._names])
        flags = np.full(n, np.nan) if ood is None else np.asarray(ood, np.float64)
        with self._lock:
            self._append(rows, probs.argmax(1), probs.max(1), flags)
            self._since_verdict += n
            due = self._since_verdict >= self._verdict_every
            if due:
                self._since_verdict = 0
        if due:
            self.report()  # keeps the drifting state (and its log line) current without a scraper

    def _append(self, rows: np.ndarray, classes: np.ndarray, confidence: np.ndarray, flags: np.ndarray) -> None:
        self._total_seen += len(rows)
        keep = slice(max(0, len(rows) - self.window), None)  # a batch larger than the window: its newest
        rows, classes, confidence, flags = rows[keep], classes[keep], confidence[keep], flags[keep]
        where = (self._next + np.arange(len(rows))) % self.window
        self._stats[where], self._classes[where], self._confidence[where], self._ood[where] = (
            rows, classes, confidence, flags)
        self._next = int((self._next + len(rows)) % self.window)
        self._observed = min(self.window, self._observed + len(rows))

    def _snapshot(self) -> tuple[Records, int]:
        with self._lock:
            n = self._observed  # the filled slots are 0..n-1 until the ring wraps, then all of them
            records = Records(self._stats[:n].copy(), self._classes[:n].copy(), self._confidence[:n].copy(),
                              self._ood[:n].copy())
            return records, self._total_seen

    def report(self) -> dict[str, Any]:
        """The window's scores and verdict, plain JSON (no verdict below ``min_observed`` images)."""
        records, total_seen = self._snapshot()
        observed = len(records.classes)
        scores = window_scores(self.reference, records)
        alarms: list[str] = []
        warnings: list[str] = []
        if observed >= self.min_observed:
            alarms, warnings = verdict(scores, self.reference.thresholds)
            known_ood = int(np.count_nonzero(~np.isnan(records.ood)))
            if "ood_rate" in alarms and known_ood < self.min_observed:
                alarms.remove("ood_rate")  # too few images came with an OOD flag
        drifting = bool(alarms)
        self._record_verdict(drifting, alarms, total_seen, observed)
        return {"enabled": True, "window": self.window, "observed": observed, "total_seen": total_seen,
                "min_observed": self.min_observed, "scores": scores, "alarms": alarms, "warnings": warnings,
                "drifting": drifting, "thresholds": self.reference.thresholds.to_dict(),
                "reference_images": self.reference.images}

    def _record_verdict(self, drifting: bool, alarms: list[str], total_seen: int, observed: int) -> None:
        with self._lock:
            if total_seen < self._judged_at:
                return
            self._judged_at = total_seen
            flipped, self._drifting = drifting != self._drifting, drifting
        if flipped and drifting:
            logger.warning("input drift over the last %d served images: %s", observed, ", ".join(alarms))
        elif flipped:
            logger.info("input drift cleared over the last %d served images", observed)

    def gauges(self) -> dict[str, float]:
        """Flat numbers for Prometheus gauges, named ``[a-zA-Z0-9_]`` (e.g. ``psi_mean_luminance``, ``drifting``)."""
        report = self.report()
        values = {_UNSAFE.sub("_", name): float(value) for name, value in report["scores"].items()}
        values.update(observed=float(report["observed"]), total_seen=float(report["total_seen"]),
                      alarms=float(len(report["alarms"])), warnings=float(len(report["warnings"])),
                      drifting=float(report["drifting"]))
        return values
