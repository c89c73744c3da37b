"""Out-of-distribution detection: fit detectors on a bundle's features, measure, and ship one.

Detectors (registry ``OOD_DETECTORS``) are fitted with pytorch-ood on the *bundle's*
ONNX outputs (``logits`` and penultimate ``features``) of the training split, so what
is measured is what ships. Each serialises its fitted arrays into ``guardrails/ood.npz``
and is scored at inference by the NumPy scorers of :mod:`lensforge.deploy.guardrails`
(tested equal to pytorch-ood's scores). Scores follow pytorch-ood: higher = more OOD.

- ``msp``: minus the top softmax probability at the bundle's temperature (the baseline);
- ``energy``: minus log-sum-exp of the logits (t = 1, as in Liu et al. 2020);
- ``mahalanobis``: half the squared distance to the closest class mean under a shared
  covariance (Lee et al. 2018), fitted on the classes present in the data;
- ``vim``: virtual logit from the residual of a principal subspace minus the energy
  (Wang et al. 2022). It needs the classifier's W and b: we fit them by least squares
  from training features to logits, which is exact for the linear head every exported
  model has (``get_classifier()`` on pre-logits) and works unchanged for quantized or
  pruned bundles, whose ONNX graphs hold the head in many different node patterns.
  The fit's relative residual is checked (``HEAD_RESIDUAL_MAX``) and recorded;
- ``knn``: distance to the k-th nearest unit-normalised training feature (Sun et al.
  2022). pytorch-ood 0.4 uses scikit-learn here (no faiss). The bank is a seeded
  subsample of at most ``bank_size`` = 2,000 training features, which bounds the
  shipped file (2,000 x D float32) and the per-image cost (one 2,000 x D product);
  k = 10 (the paper scales k with the bank: 50 for 50,000 CIFAR-10 images, 10 for
  1% of ImageNet; on digits, mean validation AUROC is 0.996/0.995/0.994/0.993/0.990
  for k = 1/5/10/20/50, see benchmarks/ood_detectors.py: flat, and a middle k is less
  sensitive to a single mislabelled or odd training image than k = 1).

Evaluation: AUROC with OOD as the positive class (the chance that an OOD image scores
higher than an in-distribution one), and FPR95: the fraction of OOD images *accepted*
at the threshold that keeps 95% of in-distribution images (in-distribution positive,
the convention of Liang et al. 2018 and OpenOOD, and the threshold we deploy; note that
pytorch-ood's ``FPRAtTPR`` takes OOD as positive instead). The detector shipped is the
one with the best mean AUROC over the OOD sets on the *validation* split, never test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.data.preprocess import Preprocess
from lensforge.data.sources import open_source
from lensforge.data.splits import Splits, load_splits, make_splits
from lensforge.data.table import ImageTable, load_table
from lensforge.deploy.bundle import Bundle, load_bundle, update_bundle
from lensforge.deploy.guardrails import GUARDRAILS_KEY, MIN_SIDE_PX, OOD_FILE, params_to_npz, score_ood
from lensforge.errors import ArtifactError, DataError, UsageError
from lensforge.registry import Registry
from lensforge.utils.io import atomic_write_json
from lensforge.utils.progress import StepProgress

TPR = 0.95  # share of in-distribution images the OOD threshold keeps
HEAD_RESIDUAL_MAX = 1e-2  # relative error of the least-squares head above which ViM is unavailable
HISTOGRAM_BINS = 30
DEFAULT_OOD_SETS = ("other_source", "uniform_noise", "gaussian_noise", "textures", "corrupted")
_DIGITS_CLASSES = [str(d) for d in range(10)]


class DetectorUnavailable(UsageError):
    """A detector that cannot be fitted on these features (e.g. ViM on a non-linear head)."""


# ---------------------------------------------------------------------------- bundle outputs


@dataclass(frozen=True)
class Outputs:
    """A bundle's ONNX outputs on some images, with their targets when known."""

    logits: np.ndarray  # (N, K) float32
    features: np.ndarray  # (N, D) float32
    targets: np.ndarray | None = None


def bundle_outputs(bundle: Bundle, images: np.ndarray, targets: np.ndarray | None = None,
                   batch_size: int = 256) -> Outputs:
    """Run the bundle (ONNX Runtime) on uint8 (N, C, H, W) images in batches."""
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        batch_logits, batch_features = bundle.predict_uint8(np.ascontiguousarray(images[start:start + batch_size]))
        logits.append(batch_logits)
        features.append(batch_features.reshape(len(batch_features), -1))
    return Outputs(np.concatenate(logits), np.concatenate(features), targets)


def check_features_output(bundle: Bundle) -> None:
    """Raise :class:`ArtifactError` unless the bundle's model has the ``features`` output."""
    outputs = {output.name for output in bundle.session.get_outputs()}
    if "features" not in outputs:
        raise ArtifactError(f"bundle {bundle.path}: model.onnx has no 'features' output (has {sorted(outputs)}); "
                            "OOD detection needs the penultimate features: re-export it with lensforge export")


# ---------------------------------------------------------------------------- detectors


@dataclass(frozen=True)
class DetectorOptions:
    """Hyperparameters of the detectors (see the module doc for the choices)."""

    knn_k: int = 10
    bank_size: int = 2000  # training features kept for knn
    vim_dim: int | None = None  # principal subspace dimension; None = D // 2 (OpenOOD's choice for ResNet-18)


@dataclass(frozen=True)
class FittedDetector:
    """A fitted detector: the arrays that ship, pytorch-ood's own scorer, and how it was fitted."""

    name: str
    params: dict[str, np.ndarray]
    reference: Callable[[np.ndarray, np.ndarray], np.ndarray]  # pytorch-ood: (logits, features) -> scores
    info: dict[str, Any] = field(default_factory=dict)

    def score(self, logits: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The NumPy scores that ship (:func:`lensforge.deploy.guardrails.score_ood`)."""
        return score_ood(self.name, self.params, logits, features)


DetectorFit = Callable[..., FittedDetector]  # (train: Outputs, *, temperature, seed, options)
OOD_DETECTORS: Registry[DetectorFit] = Registry("ood-detector")


def _tensor(array: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def _scores_of(predict: Callable[[Any], Any]) -> Callable[[np.ndarray], np.ndarray]:
    def scores(array: np.ndarray) -> np.ndarray:
        return predict(_tensor(array)).detach().cpu().numpy().astype(np.float64)

    return scores


@OOD_DETECTORS.register("msp")
def fit_msp(train: Outputs, *, temperature: float = 1.0, **_: Any) -> FittedDetector:
    from pytorch_ood.detector import MaxSoftmax

    scores = _scores_of(MaxSoftmax(None, t=temperature).predict_logits)
    return FittedDetector("msp", {"temperature": np.float64(temperature)}, lambda logits, _: scores(logits),
                          {"temperature": temperature})


@OOD_DETECTORS.register("energy")
def fit_energy(train: Outputs, **_: Any) -> FittedDetector:
    from pytorch_ood.detector import EnergyBased

    scores = _scores_of(EnergyBased(None, t=1.0).predict_logits)
    return FittedDetector("energy", {}, lambda logits, _: scores(logits), {"t": 1.0})


@OOD_DETECTORS.register("mahalanobis")
def fit_mahalanobis(train: Outputs, **_: Any) -> FittedDetector:
    from pytorch_ood.detector import Mahalanobis

    if train.targets is None:
        raise DetectorUnavailable("mahalanobis needs the training labels")
    # pytorch-ood wants labels 0..C-1 all present: index the classes the data actually has
    present, labels = np.unique(train.targets, return_inverse=True)
    detector = Mahalanobis(None).fit_features(_tensor(train.features.astype(np.float32)), _tensor(labels))
    # score in float64, as the NumPy scorer does, so the comparison measures the formula, not rounding
    detector.mu, detector.precision = detector.mu.double(), detector.precision.double()
    params = {"means": detector.mu.numpy().astype(np.float32), "precision": detector.precision.numpy()}
    return FittedDetector("mahalanobis", params, lambda _, features: _scores_of(detector.predict_features)(
        features.astype(np.float64)), {"classes": len(present)})


def linear_head(features: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares ``logits ~ features @ W.T + b``: (W (K, D), b (K,), relative residual)."""
    design = np.hstack([features.astype(np.float64), np.ones((len(features), 1))])
    coef, *_ = np.linalg.lstsq(design, logits.astype(np.float64), rcond=None)
    residual = np.linalg.norm(design @ coef - logits) / max(np.linalg.norm(logits), 1e-12)
    return coef[:-1].T, coef[-1], float(residual)


@OOD_DETECTORS.register("vim")
def fit_vim(train: Outputs, *, options: DetectorOptions = DetectorOptions(), **_: Any) -> FittedDetector:
    import torch
    from pytorch_ood.detector import ViM

    width = train.features.shape[1]
    dim = options.vim_dim or width // 2
    if not 1 <= dim < width:
        raise DetectorUnavailable(f"vim needs a principal subspace 1 <= d < D = {width} (got d = {dim})")
    if len(train.features) <= width:
        raise DetectorUnavailable(f"vim needs more training images ({len(train.features)}) than features ({width})")
    weight, bias, residual = linear_head(train.features, train.logits)
    if residual > HEAD_RESIDUAL_MAX:
        raise DetectorUnavailable(f"vim: logits are not a linear map of the features (residual {residual:.1e})")
    detector = ViM(None, d=dim, w=torch.from_numpy(weight).float(), b=torch.from_numpy(bias).float())
    detector.fit_features(_tensor(train.features.astype(np.float32)), torch.zeros(len(train.features)))
    params = {"weight": detector.w.numpy(), "bias": detector.b.numpy(), "origin": detector.u.numpy(),
              "residual_space": detector.principal_subspace.numpy(), "alpha": np.float64(detector.alpha)}
    scores = _scores_of(detector.predict_features)
    return FittedDetector("vim", params, lambda _, features: scores(features.astype(np.float32)),
                          {"d": dim, "head": "least squares", "head_residual": residual})


@OOD_DETECTORS.register("knn")
def fit_knn(train: Outputs, *, seed: int = 0, options: DetectorOptions = DetectorOptions(), **_: Any
            ) -> FittedDetector:
    import torch
    from pytorch_ood.detector import KNN

    rng = np.random.default_rng(seed)
    n = len(train.features)
    keep = np.sort(rng.choice(n, size=min(n, options.bank_size), replace=False))
    bank = train.features[keep].astype(np.float32)
    k = min(options.knn_k, len(bank))
    detector = KNN(None, k=k).fit_features(_tensor(bank), torch.zeros(len(bank), dtype=torch.long))
    unit = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    scores = _scores_of(detector.predict_features)
    return FittedDetector("knn", {"bank": unit.astype(np.float32), "k": np.int64(k)},
                          lambda _, features: scores(features.astype(np.float32)), {"k": k, "bank": len(bank)})


def fit_detector(name: str, train: Outputs, *, temperature: float = 1.0, seed: int = 0,
                 options: DetectorOptions | None = None) -> FittedDetector:
    """Fit detector ``name`` on training outputs; raises :class:`DetectorUnavailable` if it cannot."""
    return OOD_DETECTORS.get(name)(train, temperature=temperature, seed=seed, options=options or DetectorOptions())


# ---------------------------------------------------------------------------- OOD sets


@dataclass(frozen=True)
class OODContext:
    """What an OOD-set builder may use: the model input, held-out in-distribution images, a seed."""

    preprocess: Preprocess
    class_names: list[str]
    in_images: np.ndarray  # held-out in-distribution images, uint8 (N, C, H, W)
    n: int
    seed: int


OOD_SETS: Registry[Callable[[OODContext], np.ndarray]] = Registry("ood-set")


def build_ood_set(name: str, context: OODContext) -> np.ndarray:
    """uint8 (n, C, H, W) images of OOD set ``name`` at the model input."""
    return OOD_SETS.get(name)(context)


def _shape(context: OODContext) -> tuple[int, int, int, int]:
    return (context.n, context.preprocess.channels, *context.preprocess.input_size)


@OOD_SETS.register("other_source")
def other_source(context: OODContext) -> np.ndarray:
    """Another built-in data set: shapes for a digits model, digits for anything else."""
    if context.class_names == _DIGITS_CLASSES:
        side = int(min(1024, max(8, *context.preprocess.input_size)))
        spec = f"builtin:shapes?n={context.n}&size={side}&seed={context.seed}"
    else:
        spec = "builtin:digits"
    images = load_table(open_source(spec), context.preprocess).images
    pick = np.random.default_rng(context.seed).choice(len(images), size=min(context.n, len(images)), replace=False)
    return images[np.sort(pick)]


@OOD_SETS.register("uniform_noise")
def uniform_noise(context: OODContext) -> np.ndarray:
    return np.random.default_rng(context.seed).integers(0, 256, _shape(context), dtype=np.uint8)


@OOD_SETS.register("gaussian_noise")
def gaussian_noise(context: OODContext) -> np.ndarray:
    noise = np.random.default_rng(context.seed).normal(128.0, 64.0, _shape(context))
    return np.clip(noise + 0.5, 0, 255).astype(np.uint8)


@OOD_SETS.register("textures")
def textures(context: OODContext) -> np.ndarray:
    """Seeded textures: sums of random sinusoidal gratings (even) and plasma fractals (odd)."""
    rng = np.random.default_rng(context.seed)
    n, channels, height, width = _shape(context)
    out = np.empty((n, channels, height, width), dtype=np.uint8)
    for i in range(n):
        texture = _gratings(rng, channels, height, width) if i % 2 == 0 else _plasma(rng, channels, height, width)
        low, high = texture.min(), texture.max()
        out[i] = np.round(255 * (texture - low) / max(high - low, 1e-6))
    return out


def _gratings(rng: np.random.Generator, channels: int, height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    texture = np.zeros((channels, height, width))
    for _ in range(3):
        cycles = rng.uniform(1, max(2.0, max(height, width) / 4))  # periods across the image
        angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * cycles * (xs * np.cos(angle) + ys * np.sin(angle)) + phase)
        texture += rng.uniform(-1, 1, (channels, 1, 1)) * wave
    return texture


def _plasma(rng: np.random.Generator, channels: int, height: int, width: int) -> np.ndarray:
    from PIL import Image

    texture = np.zeros((channels, height, width))
    for octave in range(1, 5):
        cells = 2**octave + 1
        for c in range(channels):
            coarse = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
            texture[c] += np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC)) * 0.6**octave
    return texture


HEAVY_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "gaussian_blur", "contrast", "fog", "pixelate")


@OOD_SETS.register("corrupted")
def corrupted(context: OODContext) -> np.ndarray:
    """Held-out in-distribution images at severity 5 of three corruption families.

    Uses :mod:`lensforge.ops.corruptions` (noise, blur, then contrast or fog); without it,
    a heavy box blur plus strong Gaussian noise of our own.
    """
    rng = np.random.default_rng(context.seed)
    pick = rng.choice(len(context.in_images), size=context.n, replace=len(context.in_images) < context.n)
    images = context.in_images[pick]
    try:
        import torch

        from lensforge.ops.corruptions import CORRUPTIONS, corrupt
    except ImportError:
        return _blur_and_noise(images, rng)
    names = _pick_corruptions([name for name in HEAVY_CORRUPTIONS if name in CORRUPTIONS])
    if not names:
        return _blur_and_noise(images, rng)
    parts = np.array_split(np.arange(len(images)), len(names))
    out = images.copy()
    for name, part in zip(names, parts):
        out[part] = np.asarray(corrupt(torch.from_numpy(images[part]), name, 5, seed=context.seed))
    return out


def _pick_corruptions(available: list[str]) -> list[str]:
    """One noise, one blur and one contrast/weather corruption among those available."""
    families = (("gaussian_noise",), ("defocus_blur", "gaussian_blur"), ("contrast", "fog", "pixelate"))
    return [next(name for name in family if name in available)
            for family in families if any(name in available for name in family)]


def _blur_and_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fallback corruption: a 5x5 box blur applied twice, then Gaussian noise of std 50 grey levels."""
    blurred = images.astype(np.float64)
    for _ in range(2):
        padded = np.pad(blurred, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
        blurred = sum(padded[:, :, dy:dy + images.shape[2], dx:dx + images.shape[3]]
                      for dy in range(5) for dx in range(5)) / 25.0
    return np.clip(blurred + rng.normal(0, 50, images.shape) + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- metrics


def ood_threshold(in_scores: np.ndarray, tpr: float = TPR) -> float:
    """The score above which an image is flagged, keeping at least ``tpr`` of ``in_scores``."""
    return float(np.quantile(np.asarray(in_scores, np.float64), tpr, method="higher"))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve with OOD as the positive class (0.5 = chance, 1 = perfect)."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(labels, np.r_[in_scores, out_scores]))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = TPR) -> float:
    """Fraction of OOD images accepted at the threshold that keeps ``tpr`` of in-distribution ones."""
    return float(np.mean(np.asarray(out_scores) <= ood_threshold(in_scores, tpr)))


def histograms(in_scores: np.ndarray, out_scores: dict[str, np.ndarray], bins: int = HISTOGRAM_BINS
               ) -> dict[str, Any]:
    """Counts over shared bins (0.5th-99.5th percentile of all scores; outliers in the end bins)."""
    everything = np.concatenate([in_scores, *out_scores.values()])
    low, high = np.percentile(everything, [0.5, 99.5])
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)

    def counts(scores: np.ndarray) -> list[int]:
        return np.histogram(np.clip(scores, edges[0], edges[-1]), edges)[0].tolist()

    return {"edges": edges.tolist(), "counts": {"in_distribution": counts(in_scores),
                                                **{name: counts(s) for name, s in out_scores.items()}}}


# ---------------------------------------------------------------------------- in-distribution data


# Images per split used to fit and choose guardrails: class means and covariances, kNN banks,
# the 95%-kept threshold and the abstain threshold are stable well below this (a 95% quantile
# from 5,000 scores has a standard error of ~0.3 points); more only costs time on big data sets.
MAX_IMAGES_PER_SPLIT = 5_000


@dataclass
class InDistribution:
    """In-distribution data in the bundle's class order, its splits, and cached bundle outputs."""

    bundle: Bundle
    table: ImageTable
    targets: np.ndarray
    splits: Splits
    spec: str | None
    native_size: tuple[int, int] | None = None  # (height, width) of built-in arrays
    batch_size: int = 256
    max_per_split: int = MAX_IMAGES_PER_SPLIT
    seed: int = 0
    _outputs: dict[str, Outputs] = field(default_factory=dict, init=False, repr=False)

    def indices(self, split: str) -> np.ndarray:
        indices = self.splits.get(split)
        if len(indices) > self.max_per_split:  # a seeded subsample, the same on every call
            rng = np.random.default_rng(self.seed)
            indices = np.sort(rng.choice(indices, self.max_per_split, replace=False))
        if not len(indices):
            raise DataError(f"split '{split}' of {self.spec or 'the data'} is empty")
        return indices

    def images(self, split: str) -> np.ndarray:
        return self.table.images[self.indices(split)]

    def outputs(self, split: str) -> Outputs:
        if split not in self._outputs:
            indices = self.indices(split)
            self._outputs[split] = bundle_outputs(self.bundle, self.table.images[indices], self.targets[indices],
                                                  self.batch_size)
        return self._outputs[split]


def _run_dir_of(bundle: Bundle, run_dir: str | os.PathLike[str] | None) -> Path | None:
    if run_dir is not None:
        return Path(run_dir)
    parent = bundle.path.parent
    return parent if (parent / "run.json").exists() else None


def open_in_distribution(
    bundle: Bundle,
    data: str | ImageTable | None = None,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> InDistribution:
    """The bundle's in-distribution data: ``data`` or its run's, split like the run when it is the run's.

    Raises:
        UsageError: no data given and the bundle is not inside a run.
        DataError: data classes the bundle does not know, or images of the wrong shape.
    """
    from lensforge.evaluate.runner import align_classes
    from lensforge.train.run import read_run_info

    run = _run_dir_of(bundle, run_dir)
    run_data = read_run_info(run).get("data") if run is not None else None
    native_size = None
    if isinstance(data, ImageTable):
        table, spec = data, None
    else:
        if data is None and run_data is None:
            raise UsageError(f"bundle {bundle.path} is not inside a run: pass the data it was trained on")
        source = open_source(data or run_data)
        table, spec = load_table(source, bundle.preprocess, on_bad_image="skip"), source.spec
        native_size = source.native_size
    _check_table(table, bundle)
    try:
        targets = align_classes(table, bundle.class_names)
    except DataError as e:
        raise DataError(f"{spec or 'data'} does not match bundle {bundle.path}: {e}") from None
    if run is not None and spec is not None and spec == run_data and (run / "splits.json").exists():
        splits = load_splits(run / "splits.json", table)
    else:
        splits = make_splits(table, seed=seed)
    return InDistribution(bundle, table, targets, splits, spec, native_size, batch_size=batch_size, seed=seed)


def _check_table(table: ImageTable, bundle: Bundle) -> None:
    expected = (bundle.preprocess.channels, *bundle.preprocess.input_size)
    if table.images.ndim != 4 or tuple(table.images.shape[1:]) != expected or table.images.dtype != np.uint8:
        raise DataError(f"data images are {table.images.dtype} {tuple(table.images.shape[1:])}; "
                        f"bundle {bundle.path} needs uint8 {expected}")


# ---------------------------------------------------------------------------- evaluation


@dataclass
class OODEvaluation:
    """Scores and metrics of every detector on an in-distribution split and the OOD sets."""

    split: str
    detectors: dict[str, FittedDetector]
    unavailable: dict[str, str]
    in_scores: dict[str, np.ndarray]
    ood_scores: dict[str, dict[str, np.ndarray]]  # detector -> OOD set -> scores

    def auroc(self, detector: str) -> dict[str, float]:
        return {name: auroc(self.in_scores[detector], s) for name, s in self.ood_scores[detector].items()}

    def fpr95(self, detector: str) -> dict[str, float]:
        return {name: fpr_at_tpr(self.in_scores[detector], s) for name, s in self.ood_scores[detector].items()}

    def mean_auroc(self, detector: str) -> float:
        return float(np.mean(list(self.auroc(detector).values())))

    def threshold(self, detector: str) -> float:
        return ood_threshold(self.in_scores[detector])

    def best(self) -> str:
        """The detector with the best mean AUROC (the first registered wins a tie)."""
        return max(self.detectors, key=self.mean_auroc)

    def table(self) -> dict[str, dict[str, Any]]:
        rows = {}
        for name in self.detectors:
            aurocs, fprs = self.auroc(name), self.fpr95(name)
            rows[name] = {"auroc": aurocs, "fpr95": fprs, "mean_auroc": float(np.mean(list(aurocs.values()))),
                          "mean_fpr95": float(np.mean(list(fprs.values()))), "threshold": self.threshold(name),
                          "fitted": self.detectors[name].info}
        return rows

    def report(self) -> dict[str, Any]:
        """JSON-ready: per-detector AUROC/FPR95 table, histograms, unavailable detectors."""
        return {"split": self.split, "tpr": TPR, "auroc_positive": "ood",
                "fpr95": f"share of OOD images accepted at the threshold keeping {TPR:.0%} of in-distribution",
                "detectors": self.table(), "unavailable": dict(self.unavailable),
                "histograms": {name: histograms(self.in_scores[name], self.ood_scores[name])
                               for name in self.detectors}}


def evaluate_ood(
    bundle: Bundle | str | os.PathLike[str],
    data: str | ImageTable | None = None,
    ood_sets: Sequence[str] = DEFAULT_OOD_SETS,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    detectors: Sequence[str] | None = None,
    split: str = "val",
    n_ood: int = 256,
    seed: int = 0,
    options: DetectorOptions | None = None,
    batch_size: int = 256,
) -> OODEvaluation:
    """Fit ``detectors`` (default: all) on the training split and score ``split`` against ``ood_sets``.

    Raises:
        ArtifactError: the bundle has no ``features`` output.
        DataError: data that does not match the bundle.
        UsageError: an unknown detector or OOD set; a requested detector that cannot be fitted.
    """
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    check_features_output(bundle)
    in_dist = open_in_distribution(bundle, data, run_dir=run_dir, seed=seed, batch_size=batch_size)
    return _evaluate(in_dist, ood_sets, detectors, split=split, n_ood=n_ood, seed=seed, options=options)


def _evaluate(in_dist: InDistribution, ood_sets: Sequence[str], detectors: Sequence[str] | None, *, split: str,
              n_ood: int, seed: int, options: DetectorOptions | None,
              advance: Callable[[str], None] = lambda what: None) -> OODEvaluation:
    if split not in ("val", "test"):
        raise UsageError(f"OOD evaluation split must be val or test (train fits the detectors), not {split!r}")
    if n_ood < 10:
        raise UsageError(f"n_ood must be at least 10 images per OOD set, not {n_ood}")
    for name in ood_sets:
        OOD_SETS.get(name)  # unknown names fail before any work
    fitted, unavailable = _fit_all(in_dist, detectors, seed, options, advance)
    held_out = in_dist.outputs(split)
    context = OODContext(in_dist.bundle.preprocess, in_dist.bundle.class_names, in_dist.images(split), n_ood, seed)
    sets = {}
    for name in ood_sets:
        sets[name] = bundle_outputs(in_dist.bundle, build_ood_set(name, context), batch_size=in_dist.batch_size)
        advance(f"OOD set {name}")
    in_scores = {name: d.score(held_out.logits, held_out.features) for name, d in fitted.items()}
    ood_scores = {name: {s: d.score(out.logits, out.features) for s, out in sets.items()} for name, d in fitted.items()}
    return OODEvaluation(split, fitted, unavailable, in_scores, ood_scores)


def _fit_all(in_dist: InDistribution, detectors: Sequence[str] | None, seed: int,
             options: DetectorOptions | None,
             advance: Callable[[str], None] = lambda what: None) -> tuple[dict[str, FittedDetector], dict[str, str]]:
    names = list(detectors) if detectors is not None else list(OOD_DETECTORS)
    train = in_dist.outputs("train")
    fitted, unavailable = {}, {}
    for name in names:
        try:
            fitted[name] = fit_detector(name, train, temperature=in_dist.bundle.temperature, seed=seed,
                                        options=options)
        except DetectorUnavailable as e:
            if detectors is not None:
                raise
            unavailable[name] = str(e)
        advance(f"detector {name}")
    if not fitted:
        raise UsageError(f"no OOD detector could be fitted on bundle {in_dist.bundle.path}: {unavailable}")
    return fitted, unavailable


# ---------------------------------------------------------------------------- guardrails


def fit_guardrails(
    bundle: Bundle | str | os.PathLike[str],
    data: str | ImageTable | None = None,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    detector: str = "auto",
    ood_sets: Sequence[str] = DEFAULT_OOD_SETS,
    target_risk: float | None = None,
    n_ood: int = 256,
    seed: int = 0,
    options: DetectorOptions | None = None,
    batch_size: int = 256,
    write: bool = True,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Fit OOD detection, input-quality checks and abstention, and write them into the bundle.

    ``bundle`` is a bundle or a run folder (its ``bundle/``, exported first if missing).
    Detectors are fitted on the training split; the detector (``"auto"``: best mean AUROC),
    its threshold (95% of in-distribution kept) and the abstain threshold are chosen on the
    validation split, and so is the drift reference (``guardrails["drift"]``, see
    :mod:`lensforge.stress.drift_reference`). Writes ``guardrails/ood.npz`` and the manifest key ``"guardrails"``
    with :func:`~lensforge.deploy.bundle.update_bundle`. Returns the report: detector table,
    histograms, choice, quality reference, risk-coverage curve; with ``write``, it also goes
    to ``RUN/stress/ood.json`` when the bundle belongs to a run (as calibrate does).

    Raises:
        ArtifactError: the bundle has no ``features`` output, or is altered.
        DataError: data that does not match the bundle.
        UsageError: an unknown detector or OOD set, or no data for a bundle outside a run.
    """
    from lensforge.stress.calibration import resolve_bundle

    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(resolve_bundle(bundle))
    _check_guardable(bundle, detector)
    detectors = None if detector == "auto" else _with_msp(detector)
    steps = len(detectors if detectors is not None else list(OOD_DETECTORS)) + len(ood_sets) + 3
    with StepProgress("guardrails", steps, enabled=show_progress) as advance:
        in_dist = open_in_distribution(bundle, data, run_dir=run_dir, seed=seed, batch_size=batch_size)
        evaluation = _evaluate(in_dist, ood_sets, detectors, split="val", n_ood=n_ood, seed=seed, options=options,
                               advance=advance)
        chosen = evaluation.best() if detector == "auto" else detector
        fitted = _fit_and_write(bundle, in_dist, evaluation, chosen, target_risk, seed, advance)
    report = {"bundle": str(bundle.path), "data": in_dist.spec, **evaluation.report(), "chosen": chosen,
              "threshold": fitted["ood"]["threshold"], "gain_over_msp_auroc_points": _gain_over_msp(evaluation, chosen),
              "in_distribution": {s: int(len(in_dist.indices(s))) for s in ("train", "val")},
              "ood_sets": {name: n_ood for name in ood_sets}, "quality": fitted["quality"],
              "abstain": fitted["abstain"], "selective": fitted["selective"]}
    run = _run_dir_of(bundle, run_dir)
    if write and run is not None:
        atomic_write_json(run / "stress" / "ood.json", report)
    return report



def _fit_and_write(bundle: Bundle, in_dist: Any, evaluation: Any, chosen: str, target_risk: float | None,
                   seed: int, advance: Any) -> dict[str, Any]:
    """Abstain threshold, input-quality and drift references, and the chosen detector, written into the bundle."""
    from lensforge.stress.drift_reference import fit_drift_reference
    from lensforge.stress.quality import fit_quality
    from lensforge.stress.selective import fit_abstain

    val = in_dist.outputs("val")
    abstain, selective = fit_abstain(val.logits, val.targets, temperature=bundle.temperature, target_risk=target_risk)
    advance("abstain threshold")
    quality = fit_quality(in_dist.images("train"), bundle.preprocess.input_size,
                          native_sides=_native_sides(in_dist), check_images=in_dist.images("val"))
    advance("input-quality reference")
    ood_entry = _ood_entry(evaluation, chosen, in_dist, seed)
    drift = fit_drift_reference(in_dist.images("val"), val.logits, temperature=bundle.temperature,
                                ood_flags=evaluation.in_scores[chosen] > ood_entry["threshold"],
                                fitted_on={"data": in_dist.spec})
    spec = {"version": 1, "ood": ood_entry, "quality": quality, "abstain": abstain}
    update_bundle(bundle, files={OOD_FILE: params_to_npz(evaluation.detectors[chosen].params)},
                  updates={GUARDRAILS_KEY: {**spec, "drift": drift} if drift else spec})
    advance("written into the bundle")
    return {"ood": ood_entry, "quality": quality, "abstain": abstain, "selective": selective}


def _check_guardable(bundle: Bundle, detector: str) -> None:
    """A features output, inputs large enough for quality checks, and a known detector name."""
    check_features_output(bundle)
    if min(bundle.preprocess.input_size) < MIN_SIDE_PX:
        raise DataError(f"bundle {bundle.path}: input {bundle.preprocess.input_size} is below {MIN_SIDE_PX} px "
                        "a side, too small for input-quality checks")
    if detector != "auto":
        OOD_DETECTORS.get(detector)


def _with_msp(detector: str) -> list[str]:
    return [detector] if detector == "msp" else ["msp", detector]  # msp is the baseline the report compares with


def _ood_entry(evaluation: OODEvaluation, chosen: str, in_dist: InDistribution, seed: int) -> dict[str, Any]:
    return {"detector": chosen, "threshold": evaluation.threshold(chosen), "file": OOD_FILE,
            "score": "higher = more out-of-distribution; flagged above threshold", "tpr": TPR,
            "fitted_on": {"data": in_dist.spec, "split": "train", "images": int(len(in_dist.indices("train"))),
                          "seed": seed, **evaluation.detectors[chosen].info},
            "selected_on": {"split": "val", "images": int(len(in_dist.indices("val"))), "by": "mean AUROC"},
            "auroc": evaluation.auroc(chosen), "fpr95": evaluation.fpr95(chosen)}


def _gain_over_msp(evaluation: OODEvaluation, chosen: str) -> float | None:
    if "msp" not in evaluation.detectors:
        return None
    return 100 * (evaluation.mean_auroc(chosen) - evaluation.mean_auroc("msp"))


def _native_sides(in_dist: InDistribution, limit: int = 500) -> list[int] | None:
    """Shorter sides of (up to ``limit``) training images as stored: built-in arrays, or file headers."""
    if in_dist.native_size is not None:
        return [min(in_dist.native_size)]
    if in_dist.spec is None:
        return None
    from PIL import Image

    sides = []
    for i in in_dist.indices("train")[:limit]:
        try:
            with Image.open(in_dist.table.origins[i]) as img:
                sides.append(min(img.size))
        except (OSError, ValueError):
            continue
    return sides or None
