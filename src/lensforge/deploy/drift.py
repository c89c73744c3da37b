"""The drift reference a guarded bundle carries (``guardrails["drift"]``): its schema and statistics.

Part of the bundle format, so it sits with the bundle: :mod:`lensforge.stress.drift_reference`
fits it and :mod:`lensforge.serve.drift` compares served traffic with it (see that module for
the tests and their thresholds). NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lensforge.deploy.guardrails import GUARDRAILS_KEY, image_statistics
from lensforge.errors import ArtifactError

DRIFT_KEY = "drift"  # key inside the manifest's guardrails mapping
DRIFT_VERSION = 1  # bump when an old reader would misread a new reference
MIN_OBSERVED = 200  # images in the window before any verdict (see lensforge.serve.drift: PSI's noise floor)
PSI_FLOOR = 1e-4  # smallest proportion used in PSI, so an empty bin contributes a finite amount
SIGNIFICANT_DIGITS = 5  # of input statistics and reference numbers: short JSON, and far finer than any drift
CHANNEL_NAMES = ("red", "green", "blue")

# ---------------------------------------------------------------------------- statistics and tests


def round_significant(values: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    """float64 ``values`` rounded to ``digits`` significant digits (NaN, inf and 0 kept)."""
    values = np.asarray(values, np.float64)
    out = values.copy()
    nonzero = np.isfinite(values) & (values != 0)
    scale = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(values[nonzero]))))
    out[nonzero] = np.round(values[nonzero] * scale) / scale
    return out


def input_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image statistics of uint8 (N, C, H, W) model inputs, by name, to 5 significant digits.

    The quality statistics of :func:`lensforge.deploy.guardrails.image_statistics` (mean
    luminance, saturated fraction, contrast, sharpness: NaN for flat images) and, for
    colour inputs, the mean of each channel (grey levels 0..255). Rounded here, on both
    sides, so the reference stored short in JSON holds exactly the values served images
    give: otherwise a tie (many images with 7/64 saturated pixels) would split between
    0.109375 served and 0.10938 stored, and KS would call it drift.
    """
    stats = dict(image_statistics(images))
    if images.shape[1] == len(CHANNEL_NAMES):
        means = images.mean(axis=(2, 3), dtype=np.float64)
        stats.update({f"mean_{name}": means[:, c] for c, name in enumerate(CHANNEL_NAMES)})
    return {name: round_significant(values) for name, values in stats.items()}


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two proportion vectors over the same bins."""
    e = np.maximum(np.asarray(expected, np.float64), PSI_FLOOR)
    a = np.maximum(np.asarray(actual, np.float64), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def kolmogorov_sf(x: np.ndarray | float) -> np.ndarray:
    """P(K > x) of the Kolmogorov distribution (SciPy's ``kstwobign.sf``), to ~1e-15.

    Two series, each fast where the other is slow: the theta-function form below x = 1,
    the alternating series ``2 sum (-1)^(k-1) exp(-2 k^2 x^2)`` above.
    """
    shape = np.shape(x)
    x = np.asarray(x, np.float64).reshape(-1)
    k = np.arange(1, 6, dtype=np.float64)[:, None]  # five terms reach double precision on each side
    low = np.clip(x, 1e-3, 1.0)  # below 0.18 the answer is 1 to double precision
    small = 1.0 - math.sqrt(2 * math.pi) / low * np.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8 * low**2)).sum(0)
    high = np.maximum(x, 1.0)
    large = 2.0 * ((-1.0) ** (k - 1) * np.exp(-2.0 * k**2 * high**2)).sum(0)
    return np.clip(np.where(x < 1.0, small, large), 0.0, 1.0).reshape(shape)


def ks_2samp(sample: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic D and its asymptotic two-sided p-value (see the module doc)."""
    a, b = np.sort(np.asarray(sample, np.float64)), np.sort(np.asarray(reference, np.float64))
    n, m = len(a), len(b)
    if not n or not m:
        raise ValueError("ks_2samp needs two non-empty samples")
    both = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, both, "right") / n - np.searchsorted(b, both, "right") / m)))
    root = math.sqrt(n * m / (n + m))
    return d, float(kolmogorov_sf((root + 0.12 + 0.11 / root) * d))


# ---------------------------------------------------------------------------- the reference


@dataclass(frozen=True)
class Histogram:
    """Reference proportions over bins ``(-inf, c1], (c1, c2], ..., (ck, inf)``, then non-finite values."""

    cuts: np.ndarray  # increasing inner edges
    proportions: np.ndarray  # len(cuts) + 2 values summing to 1; the last is the non-finite share

    def of(self, values: np.ndarray) -> np.ndarray:
        """Proportions of ``values`` in the same bins (the same length as ``proportions``)."""
        values = np.asarray(values, np.float64)
        finite = np.isfinite(values)
        counts = np.bincount(np.searchsorted(self.cuts, values[finite], "left"), minlength=len(self.cuts) + 1)
        return np.append(counts, np.count_nonzero(~finite)) / max(len(values), 1)

    def to_dict(self) -> dict[str, Any]:
        return {"cuts": self.cuts.tolist(), "proportions": self.proportions[:-1].tolist(),
                "nonfinite": float(self.proportions[-1])}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Histogram:
        cuts = np.asarray(spec["cuts"], np.float64).reshape(-1)
        proportions = np.append(np.asarray(spec["proportions"], np.float64), float(spec.get("nonfinite", 0.0)))
        if len(proportions) != len(cuts) + 2 or np.any(np.diff(cuts) <= 0):
            raise ValueError("a histogram needs increasing cuts and one proportion more than cuts")
        return cls(cuts, proportions)


@dataclass(frozen=True)
class ClassHistogram:
    """Reference proportions of predicted classes, in contiguous groups ``edges[g] <= class < edges[g + 1]``."""

    edges: np.ndarray  # int, from 0 to the number of classes
    proportions: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.edges[-1])

    def of(self, classes: np.ndarray) -> np.ndarray:
        groups = np.searchsorted(self.edges, np.asarray(classes, np.int64), "right") - 1
        return np.bincount(groups, minlength=len(self.proportions)) / max(len(groups), 1)

    def to_dict(self) -> dict[str, Any]:
        return {"class_edges": self.edges.tolist(), "proportions": self.proportions.tolist()}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> ClassHistogram:
        edges = np.asarray(spec["class_edges"], np.int64).reshape(-1)
        proportions = np.asarray(spec["proportions"], np.float64).reshape(-1)
        if len(edges) < 2 or edges[0] != 0 or np.any(np.diff(edges) <= 0) or len(proportions) != len(edges) - 1:
            raise ValueError("class_edges must rise from 0, one more than proportions")
        return cls(edges, proportions)


@dataclass(frozen=True)
class DriftThresholds:
    """When a score warns or alarms (see the module doc for the sources)."""

    psi_warn: float = 0.1
    psi_alarm: float = 0.25
    ks_p_value_alarm: float = 0.01  # family-wise: divided by the number of statistics (Bonferroni)
    ood_rate_z_alarm: float = 4.0  # one-sided binomial z of the window's OOD rate

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ks_correction": "bonferroni"}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> DriftThresholds:
        return cls(**{name: float(spec[name]) for name in cls.__dataclass_fields__ if name in spec})


@dataclass(frozen=True)
class DriftReference:
    """What the window is compared with: validation behaviour of the bundle."""

    statistics: dict[str, Histogram]
    samples: dict[str, np.ndarray]  # sorted finite reference values per statistic, for KS
    predicted_class: ClassHistogram
    confidence: Histogram
    ood_rate: float | None  # share of validation images flagged OOD; None without an OOD detector
    images: int  # validation images the reference was fitted on
    temperature: float  # of the confidences
    thresholds: DriftThresholds = DriftThresholds()
    fitted_on: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry (plain JSON)."""
        return {
            "version": DRIFT_VERSION,
            "fitted_on": dict(self.fitted_on or {}), "images": self.images, "temperature": self.temperature,
            "thresholds": self.thresholds.to_dict(),
            "statistics": {name: {**hist.to_dict(), "sample": self.samples[name].tolist()}
                           for name, hist in self.statistics.items()},
            "predicted_class": self.predicted_class.to_dict(),
            "confidence": self.confidence.to_dict(),
            "ood_rate": self.ood_rate,
        }

    @classmethod
    def from_dict(cls, spec: Any, where: str) -> DriftReference:
        """Parse a manifest entry; raises :class:`ArtifactError` naming ``where`` when it is damaged."""
        what = f"{where}: {GUARDRAILS_KEY}.{DRIFT_KEY} in the manifest"
        if not isinstance(spec, Mapping):
            raise ArtifactError(f"{what} must be a mapping")
        version = spec.get("version")
        if not isinstance(version, int) or version > DRIFT_VERSION:
            raise ArtifactError(f"{what} has version {version!r}; this lensforge reads up to {DRIFT_VERSION}: "
                                "upgrade lensforge")
        try:
            stats = spec["statistics"]
            ood_rate = spec.get("ood_rate")
            return cls(
                statistics={str(name): Histogram.from_dict(entry) for name, entry in stats.items()},
                samples={str(name): np.sort(np.asarray(entry.get("sample", []), np.float64)) for name, entry
                         in stats.items()},
                predicted_class=ClassHistogram.from_dict(spec["predicted_class"]),
                confidence=Histogram.from_dict(spec["confidence"]),
                ood_rate=None if ood_rate is None else float(ood_rate),
                images=int(spec["images"]), temperature=float(spec.get("temperature", 1.0)),
                thresholds=DriftThresholds.from_dict(spec.get("thresholds", {})),
                fitted_on=dict(spec.get("fitted_on", {})),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{what} is invalid ({type(e).__name__}: {e})") from None
