"""Temperature scaling: recovers a known temperature, lowers ECE, lands in the bundle, used by predict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lensforge.deploy import load_bundle
from lensforge.errors import DataError, UsageError
from lensforge.stress.calibration import (
    calibrate,
    calibrate_logits,
    expected_calibration_error,
    fit_temperature,
    nll,
)


def _sampled(n: int, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): perfectly calibrated at T = 1."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, k))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    targets = np.array([rng.choice(k, p=p) for p in probs])
    return logits, targets


def test_recovers_the_temperature_of_an_overconfident_model():
    logits, targets = _sampled(4000)
    overconfident = logits * 3.0  # what a network trained to zero loss looks like
    assert fit_temperature(overconfident, targets) == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(overconfident, targets)
    result = calibrate_logits(overconfident, targets)
    after = result.summary["val"]["after"]["ece"]
    assert before > 0.1 and after < before / 3
    assert nll(overconfident, targets, result.temperature) < nll(overconfident, targets)
    accuracy = result.summary["val"]["accuracy"]
    assert accuracy == pytest.approx((overconfident.argmax(1) == targets).mean())  # argmax unchanged


def test_ece_of_a_calibrated_model_is_small():
    logits, targets = _sampled(20000, seed=1)
    assert expected_calibration_error(logits, targets) < 0.02


@pytest.mark.parametrize("logits, targets, error, match", [
    (np.zeros((5, 3)), np.zeros(5, dtype=int), DataError, "too few"),
    (np.full((30, 3), np.nan), np.zeros(30, dtype=int), DataError, "non-finite"),
    (np.zeros((30, 3)), np.zeros(29, dtype=int), UsageError, "logits"),
])
def test_bad_fitting_data(logits, targets, error, match):
    with pytest.raises(error, match=match):
        fit_temperature(logits, targets)


@pytest.fixture(scope="module")
def run_dir(digits_run):
    return digits_run


def test_calibrate_writes_the_temperature_into_the_bundle(run_dir, tmp_path):
    from lensforge.deploy.predict import predict_files

    result = calibrate(run_dir)
    bundle = load_bundle(run_dir / "bundle")  # hashes still verify after the update
    assert bundle.temperature == pytest.approx(result.temperature) and result.temperature != 1.0
    calibration = bundle.manifest["calibration"]
    assert calibration["ece_after"] <= calibration["ece_before"] + 0.01
    saved = json.loads((run_dir / "stress" / "calibration.json").read_text())
    assert saved["temperature"] == pytest.approx(result.temperature)
    assert len(saved["val"]["after"]["reliability"]["count"]) == 15
    # predict applies it: confidences are those of softmax(logits / T)
    from PIL import Image

    image = np.full((8, 8), 200, dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    row = next(iter(predict_files(bundle, tmp_path / "x.png")))
    logits, _ = bundle.predict_uint8(np.asarray(Image.open(tmp_path / "x.png"))[None, None])
    scaled = logits[0] / result.temperature
    expected = np.exp(scaled - scaled.max()).max() / np.exp(scaled - scaled.max()).sum()
    assert row["confidence"] == pytest.approx(expected, rel=1e-4)


def test_calibrate_refuses_what_is_not_a_bundle(tmp_path):
    with pytest.raises(UsageError, match="neither a run folder .* nor a bundle"):
        calibrate(tmp_path)
