"""Selective prediction: the risk-coverage curve, AURC and the abstain threshold."""

from __future__ import annotations

import numpy as np
import pytest

from lensforge.errors import DataError, UsageError
from lensforge.stress.selective import abstain_threshold, aurc, fit_abstain, risk_coverage


def _classifier_outputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 5-class model that is right ~80% of the time and less sure when wrong."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 5, n)
    logits = rng.normal(0, 1, (n, 5))
    right = rng.random(n) < 0.8
    margin = np.where(right, rng.uniform(1, 5, n), rng.uniform(0, 1.5, n))
    logits[np.arange(n), np.where(right, targets, (targets + 1) % 5)] += margin
    return logits, targets


def test_curve_coverage_rises_as_the_threshold_falls():
    rng = np.random.default_rng(0)
    confidence = np.round(rng.random(500), 2)  # many ties
    correct = rng.random(500) < confidence
    curve = risk_coverage(confidence, correct)
    assert np.all(np.diff(curve["threshold"]) < 0) and np.all(np.diff(curve["coverage"]) > 0)
    assert curve["coverage"][-1] == 1.0
    assert curve["risk"][-1] == pytest.approx(1 - correct.mean())
    for threshold, coverage, risk in zip(curve["threshold"], curve["coverage"], curve["risk"]):
        accepted = confidence >= threshold  # each point is a deployable threshold
        assert coverage == accepted.mean() and risk == pytest.approx((~correct[accepted]).mean())


def test_aurc_rewards_a_confidence_that_ranks_errors_last():
    correct = np.r_[np.ones(80, bool), np.zeros(20, bool)]
    good = np.linspace(1, 0, 100)  # every right answer more confident than every wrong one
    assert aurc(good, correct) < aurc(np.random.default_rng(0).random(100), correct) < aurc(1 - good, correct)
    assert aurc(good, np.ones(100, bool)) == 0.0


def test_abstain_threshold_meets_the_target_risk():
    logits, targets = _classifier_outputs(2000, seed=0)
    entry, report = fit_abstain(logits, targets)
    assert entry["target_risk"] == pytest.approx(entry["validation"]["error"] / 2)  # ~20% error: above the floor
    assert entry["validation"]["risk"] <= entry["target_risk"] < entry["validation"]["error"]
    assert 0 < entry["validation"]["coverage"] < 1
    assert report["aurc"] < report["error"]
    # on fresh data from the same model the accepted images have a lower error
    fresh_logits, fresh_targets = _classifier_outputs(2000, seed=1)
    shifted = fresh_logits - fresh_logits.max(1, keepdims=True)
    confidence = np.exp(shifted).max(1) / np.exp(shifted).sum(1)
    correct = fresh_logits.argmax(1) == fresh_targets
    accepted = confidence >= entry["threshold"]
    assert (~correct[accepted]).mean() < 0.75 * (~correct).mean()


def test_given_target_risk_and_temperature_are_recorded():
    logits, targets = _classifier_outputs(500, seed=2)
    entry, _ = fit_abstain(logits, targets, temperature=2.0, target_risk=0.05)
    assert entry["target_risk"] == 0.05 and entry["temperature"] == 2.0 and entry["target"] == "given"
    assert entry["validation"]["risk"] <= 0.05


def test_default_target_is_at_least_one_percent():
    logits = np.eye(3)[np.arange(300) % 3] * 5.0
    targets = np.arange(300) % 3
    targets[:2] = (targets[:2] + 1) % 3  # 2 errors in 300: halving would aim at 0.33%
    entry, _ = fit_abstain(logits, targets)
    assert entry["target_risk"] == 0.01 and entry["threshold"] == 0.0 and entry["validation"]["coverage"] == 1.0


def test_edge_cases_never_or_always_abstain():
    confidence = np.array([0.9, 0.8, 0.7])
    assert abstain_threshold(confidence, np.array([True, True, True]), 0.0) == 0.0  # no errors: never abstain
    always = abstain_threshold(confidence, np.array([False, True, True]), 0.0)  # top answer wrong
    assert always > confidence.max()
    assert abstain_threshold(confidence, np.array([True, True, False]), 0.0) == 0.8
    with pytest.raises(UsageError, match="target risk"):
        abstain_threshold(confidence, np.array([True, True, True]), 1.5)
    with pytest.raises(DataError, match="non-empty"):
        risk_coverage(np.array([]), np.array([], bool))
