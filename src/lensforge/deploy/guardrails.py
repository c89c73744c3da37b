"""Guardrails at inference: OOD score, input-quality checks and abstention (NumPy only).

A bundle with guardrails carries ``guardrails/ood.npz`` (the fitted OOD detector's
arrays) and a ``"guardrails"`` manifest key (detector name, thresholds, quality
reference, abstain threshold); :func:`lensforge.stress.ood.fit_guardrails` writes both.
This module reads them and flags images with NumPy alone, so ``lensforge predict``
and the server keep running without torch. The scorers reproduce pytorch-ood's
``predict_features``/``predict_logits`` on the same fitted parameters (tested to 1e-4
of the score scale; measured differences are ~1e-7, float32 against float64 arithmetic).

Score convention (pytorch-ood's): higher means more out-of-distribution; an image
is flagged when its score is above the threshold.
"""

from __future__ import annotations

import io
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lensforge.deploy.bundle import Bundle, _listed_file
from lensforge.errors import ArtifactError, DataError
from lensforge.registry import Registry

GUARDRAILS_KEY = "guardrails"  # manifest key
OOD_FILE = "guardrails/ood.npz"
QUALITY_CODES = ("too_dark", "overexposed", "blurred", "low_contrast", "too_small")
SATURATION_LEVEL = 250  # luminance (0..255) at or above which a pixel counts as near-saturated
MIN_SIDE_PX = 8  # quality statistics need a Laplacian interior; smaller inputs are refused
_REC601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # luma weights of R, G, B
_FLAT_STD = 1.0  # below this luminance std (grey levels) sharpness is undefined: the image is flat


# ---------------------------------------------------------------------------- OOD scorers


@dataclass(frozen=True)
class OODScorer:
    """NumPy scoring of one detector: the arrays it needs and ``score(params, logits, features)``."""

    params: tuple[str, ...]
    score: Callable[[Mapping[str, np.ndarray], np.ndarray, np.ndarray], np.ndarray]


OOD_SCORERS: Registry[OODScorer] = Registry("ood scorer", listed=False)


def logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp in float64, stable for large values."""
    x = np.asarray(x, dtype=np.float64)
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def max_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Top softmax probability of ``logits / temperature`` per row (the prediction's confidence)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return np.exp(scaled.max(axis=1) - logsumexp(scaled))


def _msp(params: Mapping[str, np.ndarray], logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    return -max_softmax(logits, float(params["temperature"]))


def _energy(params: Mapping[str, np.ndarray], logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    return -logsumexp(logits)  # pytorch-ood's EnergyBased at t=1


def _mahalanobis(params: Mapping[str, np.ndarray], logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    z = np.asarray(features, dtype=np.float64)
    precision = np.asarray(params["precision"], dtype=np.float64)
    best = np.full(len(z), np.inf)
    for mean in np.asarray(params["means"], dtype=np.float64):
        centred = z - mean
        best = np.minimum(best, ((centred @ precision) * centred).sum(axis=1))
    return 0.5 * best  # half the squared distance to the closest class mean


def _vim(params: Mapping[str, np.ndarray], logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    head_logits = x @ np.asarray(params["weight"], np.float64).T + np.asarray(params["bias"], np.float64)
    residual = (x - np.asarray(params["origin"], np.float64)) @ np.asarray(params["residual_space"], np.float64)
    virtual_logit = float(params["alpha"]) * np.linalg.norm(residual, axis=1)
    return virtual_logit - logsumexp(head_logits)


def _knn(params: Mapping[str, np.ndarray], logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    z = np.asarray(features, dtype=np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    bank = np.asarray(params["bank"], dtype=np.float64)  # unit-length rows
    k = int(params["k"])
    # |z - b|^2 = |z|^2 + |b|^2 - 2 z.b, exact enough in float64 for unit vectors
    squared = (z * z).sum(1)[:, None] + (bank * bank).sum(1)[None, :] - 2.0 * z @ bank.T
    kth = np.partition(squared, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(kth, 0.0))  # distance to the k-th nearest training feature


OOD_SCORERS.register("msp")(OODScorer(("temperature",), _msp))
OOD_SCORERS.register("energy")(OODScorer((), _energy))
OOD_SCORERS.register("mahalanobis")(OODScorer(("means", "precision"), _mahalanobis))
OOD_SCORERS.register("vim")(OODScorer(("weight", "bias", "origin", "residual_space", "alpha"), _vim))
OOD_SCORERS.register("knn")(OODScorer(("bank", "k"), _knn))


def score_ood(name: str, params: Mapping[str, np.ndarray], logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Outlier scores (N,) of detector ``name``; higher = more out-of-distribution."""
    features = np.asarray(features).reshape(len(features), -1)
    return OOD_SCORERS.get(name).score(params, logits, features)


def params_to_npz(params: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of an uncompressed ``.npz`` holding ``params`` (plain arrays, no pickle)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in params.items()})
    return buffer.getvalue()


def params_from_npz(data: bytes, detector: str, where: str) -> dict[str, np.ndarray]:
    """Read detector arrays back (``allow_pickle=False``: a bundle may come from anyone)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            params = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{where}: {OOD_FILE} is not a readable .npz ({e})") from None
    missing = [name for name in OOD_SCORERS.get(detector).params if name not in params]
    if missing:
        raise ArtifactError(f"{where}: {OOD_FILE} lacks {', '.join(missing)} for detector {detector!r}")
    return params


# ---------------------------------------------------------------------------- input quality


def luminance(images: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) with C in {1, 3} -> float32 (N, H, W) luma in grey levels (Rec. 601)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"quality checks need images of shape (N, 1 or 3, H, W), got {images.shape}")
    if min(images.shape[2:]) < MIN_SIDE_PX:
        raise DataError(f"images of {images.shape[3]}x{images.shape[2]} px are too small for quality "
                        f"checks (need at least {MIN_SIDE_PX} px a side)")
    if images.shape[1] == 1:
        return images[:, 0].astype(np.float32)
    return np.tensordot(_REC601, images.astype(np.float32), axes=([0], [1]))


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image quality statistics of uint8 (N, C, H, W) model inputs.

    ``sharpness`` is the variance of the 4-neighbour Laplacian divided by the variance of
    the luminance: dividing makes it blind to brightness and contrast, so a dim or
    low-contrast image is not also called blurred. NaN for flat images (std < 1 grey level).
    """
    lum = luminance(images)
    laplacian = (lum[:, :-2, 1:-1] + lum[:, 2:, 1:-1] + lum[:, 1:-1, :-2] + lum[:, 1:-1, 2:]
                 - 4.0 * lum[:, 1:-1, 1:-1])
    contrast = lum.std(axis=(1, 2))
    variance = np.where(contrast >= _FLAT_STD, contrast**2, np.nan)
    return {
        "mean_luminance": lum.mean(axis=(1, 2)),
        "saturated_fraction": (lum >= SATURATION_LEVEL).mean(axis=(1, 2)),
        "contrast": contrast,
        "sharpness": laplacian.var(axis=(1, 2)) / variance,
    }


@dataclass(frozen=True)
class QualityThresholds:
    """When an input fails a quality check (luminance in grey levels 0..255, sides in px)."""

    dark_below: float  # mean luminance
    overexposed_above: float  # fraction of near-saturated pixels
    blurred_below: float  # sharpness (see image_statistics)
    low_contrast_below: float  # luminance std
    min_side_px: int  # shorter side of the decoded image, before resizing

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QualityThresholds:
        return cls(float(values["dark_below"]), float(values["overexposed_above"]),
                   float(values["blurred_below"]), float(values["low_contrast_below"]),
                   int(values["min_side_px"]))


def quality_issues(
    images: np.ndarray,
    thresholds: QualityThresholds,
    original_sizes: Sequence[tuple[int, int] | None] | None = None,
) -> list[list[str]]:
    """The failed checks of each image, as codes from :data:`QUALITY_CODES`.

    ``images`` are the uint8 model inputs (N, C, H, W); ``original_sizes`` the decoded
    (width, height) before resizing, per image (None where unknown).
    """
    stats = image_statistics(images)
    failed = {
        "too_dark": stats["mean_luminance"] < thresholds.dark_below,
        "overexposed": stats["saturated_fraction"] > thresholds.overexposed_above,
        "blurred": stats["sharpness"] < thresholds.blurred_below,  # NaN (flat) compares False
        "low_contrast": stats["contrast"] < thresholds.low_contrast_below,
    }
    sizes = list(original_sizes) if original_sizes is not None else [None] * len(images)
    failed["too_small"] = np.array([size is not None and min(size) < thresholds.min_side_px for size in sizes])
    return [[code for code in QUALITY_CODES if failed[code][i]] for i in range(len(images))]


# ---------------------------------------------------------------------------- the guardrails of a bundle


@dataclass(frozen=True)
class OODGuard:
    """A fitted OOD detector and the score above which an input is out-of-distribution."""

    detector: str
    threshold: float
    params: Mapping[str, np.ndarray]

    def scores(self, logits: np.ndarray, features: np.ndarray) -> np.ndarray:
        return score_ood(self.detector, self.params, logits, features)


@dataclass(frozen=True)
class AbstainGuard:
    """Abstain when the top softmax probability (at the fitted temperature) is below ``threshold``."""

    threshold: float
    temperature: float

    def confidence(self, logits: np.ndarray) -> np.ndarray:
        return max_softmax(logits, self.temperature)


@dataclass(frozen=True)
class Guardrails:
    """What a bundle checks at inference; each part is None when it was not fitted."""

    ood: OODGuard | None = None
    quality: QualityThresholds | None = None
    abstain: AbstainGuard | None = None

    def check(
        self,
        logits: np.ndarray,
        features: np.ndarray,
        images: np.ndarray,
        original_sizes: Sequence[tuple[int, int] | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Per image: ``{"ood", "ood_score", "quality", "abstain"}`` for the parts fitted.

        ``abstain`` is the one rule shared by local ``predict``, the server and the client: do not
        trust this prediction because the image is out of distribution, fails an input-quality
        check, or the calibrated confidence is below the fitted threshold.
        """
        rows: list[dict[str, Any]] = [{} for _ in range(len(logits))]
        if self.ood is not None:
            for row, score in zip(rows, self.ood.scores(logits, features)):
                row["ood"], row["ood_score"] = bool(score > self.ood.threshold), float(score)
        if self.quality is not None:
            for row, codes in zip(rows, quality_issues(images, self.quality, original_sizes)):
                row["quality"] = codes
        if self.abstain is not None:
            for row, confidence in zip(rows, self.abstain.confidence(logits)):
                row["abstain"] = bool(confidence < self.abstain.threshold or row.get("ood") or row.get("quality"))
        return rows


def load_guardrails(bundle: Bundle) -> Guardrails | None:
    """The bundle's guardrails, or None if it has none. Raises :class:`ArtifactError` if damaged."""
    spec = bundle.manifest.get(GUARDRAILS_KEY)
    if spec is None:
        return None
    where = f"bundle {bundle.path}"
    if not isinstance(spec, dict):
        raise ArtifactError(f"{where}: manifest key {GUARDRAILS_KEY!r} must be a mapping")
    try:
        quality, abstain = spec.get("quality"), spec.get("abstain")
        return Guardrails(
            ood=_load_ood(bundle, spec.get("ood"), where),
            quality=QualityThresholds.from_dict(quality["thresholds"]) if quality else None,
            abstain=AbstainGuard(float(abstain["threshold"]), float(abstain.get("temperature", bundle.temperature)))
            if abstain else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: invalid {GUARDRAILS_KEY!r} in manifest ({type(e).__name__}: {e})") from None


def _load_ood(bundle: Bundle, spec: Mapping[str, Any] | None, where: str) -> OODGuard | None:
    if not spec:
        return None
    detector, name = str(spec["detector"]), str(spec.get("file", OOD_FILE))
    if detector not in OOD_SCORERS:
        raise ArtifactError(f"{where}: unknown OOD detector {detector!r} (this lensforge knows "
                            f"{', '.join(OOD_SCORERS.list())}); upgrade lensforge")
    if name not in bundle.manifest["files"]:
        raise ArtifactError(f"{where}: {name} is not listed in the manifest's files")
    try:
        data = _listed_file(bundle.path, name, bundle.path).read_bytes()  # refuses ``..`` and absolute paths
    except OSError as e:
        raise ArtifactError(f"{where}: cannot read {name} ({e.strerror or e})") from None
    return OODGuard(detector, float(spec["threshold"]), params_from_npz(data, detector, where))


_CACHE: weakref.WeakKeyDictionary[Bundle, Guardrails | None] = weakref.WeakKeyDictionary()


def guardrails_for(bundle: Bundle) -> Guardrails | None:
    """:func:`load_guardrails`, read once per :class:`Bundle` object (a server predicts many times)."""
    if bundle not in _CACHE:
        _CACHE[bundle] = load_guardrails(bundle)
    return _CACHE[bundle]
