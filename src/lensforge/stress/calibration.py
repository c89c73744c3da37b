"""Temperature scaling (Guo et al. 2017): one scalar that makes confidences honest.

The temperature T minimises the negative log-likelihood of ``softmax(logits / T)`` on
the validation split; accuracy is unchanged (argmax is invariant) while the expected
calibration error (15 bins) usually falls several-fold. It is fitted on the bundle's
own ONNX logits, written into the bundle's manifest (``temperature``), and applied by
``predict`` and the server. The NLL is convex in 1/T, so a bounded scalar search over
log T (SciPy) finds the optimum without a torch optimiser or a learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.errors import DataError, UsageError
from lensforge.evaluate.metrics import ECE_BINS, reliability_bins
from lensforge.utils.io import atomic_write_json

LOG_T_BOUNDS = (-4.0, 4.0)  # T in [0.018, 55]: beyond that the logits carry no usable scale
MIN_SAMPLES = 20  # fewer validation images than this cannot pin a temperature down


def _log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    return scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / temperature)``."""
    return float(-_log_softmax(logits, temperature)[np.arange(len(targets)), targets].mean())


def expected_calibration_error(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0,
                               n_bins: int = ECE_BINS) -> float:
    """Top-label ECE with equal-width bins: sum over bins of |accuracy - confidence| x share."""
    probs = np.exp(_log_softmax(logits, temperature))
    confidence, correct = probs.max(1), (probs.argmax(1) == targets).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    gaps = [abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
            for b in range(n_bins) if (which == b).any()]
    return float(np.sum(gaps))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising validation NLL (bounded search over log T)."""
    from scipy.optimize import minimize_scalar

    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(targets):
        raise UsageError(f"fit_temperature needs logits (N, K) and N targets, got {logits.shape} and {targets.shape}")
    if len(targets) < MIN_SAMPLES:
        raise DataError(f"{len(targets)} validation images are too few to fit a temperature (need {MIN_SAMPLES})")
    if not np.isfinite(logits).all():
        raise DataError("the model produced non-finite logits on the validation images")
    found = minimize_scalar(lambda log_t: nll(logits, targets, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                            method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


@dataclass
class CalibrationResult:
    """The fitted temperature and what it did, on the fitting split and on a held-out one."""

    temperature: float
    summary: dict[str, Any]
    path: Path | None = None


def _split_report(logits: np.ndarray, targets: np.ndarray, temperature: float) -> dict[str, Any]:
    def state(t: float) -> dict[str, Any]:
        probs = np.exp(_log_softmax(logits, t))
        correct = (probs.argmax(1) == targets).astype(float)
        return {"ece": expected_calibration_error(logits, targets, t), "nll": nll(logits, targets, t),
                "mean_confidence": float(probs.max(1).mean()),
                "reliability": reliability_bins(probs.max(1), correct)}

    return {"num_samples": int(len(targets)), "accuracy": float((logits.argmax(1) == targets).mean()),
            "before": state(1.0), "after": state(temperature)}


def calibrate_logits(val_logits: np.ndarray, val_targets: np.ndarray, test_logits: np.ndarray | None = None,
                     test_targets: np.ndarray | None = None) -> CalibrationResult:
    """Fit T on validation logits; report ECE/NLL before and after on validation and (if given) test."""
    temperature = fit_temperature(val_logits, val_targets)
    summary: dict[str, Any] = {"method": "temperature scaling", "temperature": temperature, "bins": ECE_BINS,
                               "fitted_on": "val", "val": _split_report(val_logits, val_targets, temperature)}
    if test_logits is not None and test_targets is not None and len(test_targets):
        summary["test"] = _split_report(test_logits, test_targets, temperature)
    return CalibrationResult(temperature, summary)


def calibrate(target: str | Path, data: str | None = None, *, fit_split: str = "val",
              eval_split: str = "test", write: bool = True, batch_size: int = 256, seed: int = 0,
              run_dir: str | Path | None = None) -> CalibrationResult:
    """Fit the temperature of a bundle (or a run's bundle) on its ONNX logits and store it in the bundle.

    ``target`` is a bundle or a run folder (its ``bundle/`` is exported first if missing);
    ``run_dir`` names the run of a bundle kept elsewhere (its data and splits are used). The
    bundle's manifest gains ``temperature`` and ``calibration`` (ECE before/after); the summary
    also goes to ``RUN/stress/calibration.json`` when the bundle belongs to a run.
    """
    from lensforge.deploy.bundle import update_bundle
    from lensforge.evaluate.runner import open_target, predict_table, split_of

    bundle_path = resolve_bundle(target)
    opened = open_target(bundle_path, batch_size)
    if run_dir is not None:  # a bundle copied out of its run (a shipped variant): use that run's data and splits
        import json

        opened.run_dir = Path(run_dir)
        opened.data = json.loads((opened.run_dir / "run.json").read_text()).get("data")
    _, table, val_idx, val_targets = split_of(opened, data, fit_split, seed=seed)
    val_logits = predict_table(opened.predict, table.images[val_idx], batch_size)
    test_logits = test_targets = None
    if eval_split and eval_split != fit_split:
        _, table, test_idx, test_targets = split_of(opened, data, eval_split, seed=seed)
        test_logits = predict_table(opened.predict, table.images[test_idx], batch_size)
    result = calibrate_logits(val_logits, val_targets, test_logits, test_targets)
    result.summary.update({"bundle": str(bundle_path), "data": data or opened.data})
    if write:
        held_out = result.summary.get("test", result.summary["val"])
        update_bundle(bundle_path, updates={"temperature": result.temperature, "calibration": {
            "method": "temperature scaling", "fitted_on": fit_split,
            "ece_before": held_out["before"]["ece"], "ece_after": held_out["after"]["ece"],
            "evaluated_on": "test" if "test" in result.summary else fit_split}})
        if opened.run_dir is not None:
            result.path = atomic_write_json(opened.run_dir / "stress" / "calibration.json", result.summary)
    return result


def resolve_bundle(target: str | Path) -> Path:
    """A bundle folder from a bundle or a run folder (exporting the run's bundle when it has none)."""
    from lensforge.artifacts import BUNDLE_DIR, resolve_artifact

    artifact = resolve_artifact(target)
    if artifact.bundle_dir is not None:
        return artifact.bundle_dir
    from lensforge.deploy.from_run import export_run

    export_run(artifact.path)
    return artifact.path / BUNDLE_DIR
