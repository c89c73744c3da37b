"""The drift reference: its pieces on known values, and fit_guardrails writing it into a real bundle.

The bundle is the session's small network trained on digits (tests/digitnet.py); the monitor
read back from the bundle must stay quiet on the test split and alarm on noise.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from digitnet import PRE
from helpers import slow_fixture

from lensforge.data.sources import open_source
from lensforge.data.splits import make_splits
from lensforge.data.table import load_table
from lensforge.deploy.bundle import load_bundle
from lensforge.deploy.drift import psi
from lensforge.deploy.guardrails import GUARDRAILS_KEY, load_guardrails
from lensforge.serve.drift import DriftMonitor
from lensforge.stress.drift_reference import (
    KS_SAMPLE_SIZE,
    MIN_REFERENCE_IMAGES,
    class_histogram,
    fit_drift_reference,
    fit_histogram,
    ks_sample,
)
from lensforge.stress.ood import fit_guardrails
from lensforge.tasks.classification import softmax

# ---------------------------------------------------------------------------- pieces


def test_quantile_bins_leave_no_finite_bin_empty_even_with_ties():
    rng = np.random.default_rng(0)
    values = np.r_[np.zeros(800), rng.uniform(0, 1, 150), np.ones(50), [np.nan] * 20]  # a mostly-0 statistic
    hist = fit_histogram(values, 10)
    assert np.all(np.diff(hist.cuts) > 0) and hist.cuts[0] == 0.0
    assert np.all(hist.proportions[:-1] > 0) and hist.proportions.sum() == pytest.approx(1.0)
    assert hist.proportions[0] == pytest.approx(800 / 1020) and hist.proportions[-1] == pytest.approx(20 / 1020)
    smooth = fit_histogram(rng.normal(size=5000), 10)
    assert len(smooth.cuts) == 9 and np.allclose(smooth.proportions[:-1], 0.1, atol=0.002)


def test_ks_sample_is_sorted_finite_and_thinned():
    values = np.r_[np.random.default_rng(1).normal(size=3000), np.nan]
    sample = ks_sample(values)
    assert len(sample) == KS_SAMPLE_SIZE and np.all(np.diff(sample) >= 0) and np.isfinite(sample).all()
    assert sample[0] == pytest.approx(np.nanmin(values), rel=1e-4)
    assert sample[-1] == pytest.approx(np.nanmax(values), rel=1e-4)


def test_many_classes_are_grouped_and_a_collapse_still_shows():
    rng = np.random.default_rng(2)
    classes = rng.integers(0, 1000, 5000)
    hist = class_histogram(classes, 1000, 20)
    assert hist.edges[0] == 0 and hist.edges[-1] == 1000 and len(hist.proportions) <= 20
    assert np.all(np.diff(hist.edges) > 0) and np.allclose(hist.proportions, 1 / len(hist.proportions), atol=0.02)
    assert psi(hist.proportions, hist.of(rng.integers(0, 1000, 1000))) < 0.1
    assert psi(hist.proportions, hist.of(np.full(1000, 417))) > 1.0  # everything predicted as one class
    assert class_histogram(classes % 7, 7, 20).edges.tolist() == list(range(8))  # few classes: one bin each


def test_too_few_reference_images_give_no_reference():
    images = np.zeros((MIN_REFERENCE_IMAGES - 1, 1, 8, 8), np.uint8)
    assert fit_drift_reference(images, np.zeros((len(images), 3))) is None


def test_a_colour_reference_stays_small():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3000, 3, 16, 16), dtype=np.uint8)
    logits = rng.normal(size=(3000, 100))
    reference = fit_drift_reference(images, logits, temperature=2.0, ood_flags=rng.random(3000) < 0.05)
    assert set(reference["statistics"]) == {"mean_luminance", "saturated_fraction", "contrast", "sharpness",
                                            "mean_red", "mean_green", "mean_blue"}
    assert len(json.dumps(reference)) < 50_000
    assert reference["version"] == 1 and reference["temperature"] == 2.0
    assert all(len(entry["sample"]) == KS_SAMPLE_SIZE for entry in reference["statistics"].values())


# ---------------------------------------------------------------------------- written by fit_guardrails


@pytest.fixture(scope="module")
def digits():
    return load_table(open_source("builtin:digits"), PRE)


@slow_fixture(scope="module")
def guarded(digitnet_bundle_template, tmp_path_factory):
    path = shutil.copytree(digitnet_bundle_template, tmp_path_factory.mktemp("drift") / "bundle")
    fit_guardrails(path, "builtin:digits", detector="mahalanobis", ood_sets=["uniform_noise"], n_ood=32)
    return load_bundle(path)


def test_fit_guardrails_writes_the_reference_from_validation(guarded, digits):
    drift = guarded.manifest[GUARDRAILS_KEY]["drift"]
    val = make_splits(digits, seed=0).val
    assert drift["version"] == 1 and drift["fitted_on"] == {"split": "val", "images": len(val),
                                                            "data": "builtin:digits"}
    assert drift["images"] == len(val) and drift["temperature"] == guarded.temperature
    assert drift["thresholds"] == {"psi_warn": 0.1, "psi_alarm": 0.25, "ks_p_value_alarm": 0.01,
                                   "ood_rate_z_alarm": 4.0, "ks_correction": "bonferroni"}
    assert 0.0 < drift["ood_rate"] <= 0.05  # the threshold keeps at least 95% of validation
    assert set(drift["statistics"]) == {"mean_luminance", "saturated_fraction", "contrast", "sharpness"}
    assert sum(drift["predicted_class"]["proportions"]) == pytest.approx(1.0)
    assert len(json.dumps(drift)) < 50_000


def serve(monitor: DriftMonitor, bundle, images: np.ndarray) -> None:
    """What the server does per batch: calibrated probabilities and the OOD guard's flags."""
    guard = load_guardrails(bundle).ood
    for start in range(0, len(images), 64):
        batch = images[start:start + 64]
        logits, features = bundle.predict_uint8(batch)
        monitor.update(batch, softmax(logits, bundle.temperature), guard.scores(logits, features) > guard.threshold)


def test_the_bundle_monitor_is_quiet_on_test_data_and_alarms_on_noise(guarded, digits, tmp_path):
    test = digits.images[make_splits(digits, seed=0).test]
    quiet = DriftMonitor.from_bundle(guarded)
    serve(quiet, guarded, test)
    report = quiet.report()
    assert report["observed"] >= report["min_observed"] and report["drifting"] is False, report["alarms"]
    noisy = DriftMonitor.from_bundle(guarded, window=500)
    serve(noisy, guarded, np.random.default_rng(0).integers(0, 256, (250, 1, 8, 8), dtype=np.uint8))
    report = noisy.report()
    assert report["drifting"] is True and {"ood_rate", "psi_sharpness"} <= set(report["alarms"])
    plain = shutil.copytree(guarded.path, tmp_path / "unguarded")
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest[GUARDRAILS_KEY]["drift"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    assert DriftMonitor.from_bundle(load_bundle(plain)) is None  # a bundle guarded before drift references
