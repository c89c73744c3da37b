"""Fit diagnosis from synthetic per-epoch curves, one shape per kind."""

from __future__ import annotations

import pytest

from lensforge.errors import ConfigError
from lensforge.train.diagnosis import FitDiagnosis, diagnose_fit


def _rows(**columns: list[float | None]) -> list[dict]:
    epochs = len(next(iter(columns.values())))
    return [{"epoch": e, **{k: v[e] for k, v in columns.items()}} for e in range(epochs)]


def _kinds(findings: list[FitDiagnosis]) -> list[str]:
    return [f.kind for f in findings]


def test_val_loss_rising_while_train_loss_falls_is_overfitting():
    history = _rows(
        train_loss=[2.0, 1.5, 1.1, 0.8, 0.6, 0.45, 0.3, 0.2, 0.12, 0.08],
        train_acc=[0.3, 0.5, 0.62, 0.72, 0.8, 0.86, 0.91, 0.95, 0.97, 0.99],
        val_loss=[2.0, 1.6, 1.3, 1.1, 1.0, 1.05, 1.15, 1.3, 1.45, 1.6],
        val_acc=[0.3, 0.45, 0.55, 0.62, 0.66, 0.67, 0.67, 0.66, 0.66, 0.65],
    )
    (finding,) = diagnose_fit(history, num_classes=10)
    assert finding.kind == "overfitting"
    assert "gap 34 points" in finding.message and "val loss rising since epoch 4" in finding.message
    text = " ".join(finding.suggestions)
    assert "--mixup" in text and "--weight-decay" in text and "epoch-4 checkpoint" in text


def test_accuracy_gap_alone_is_overfitting_without_val_loss():
    history = _rows(train_acc=[0.6, 0.8, 0.9, 0.95, 0.96, 0.96],
                    val_acc=[0.55, 0.7, 0.76, 0.78, 0.78, 0.78])
    assert _kinds(diagnose_fit(history, num_classes=5)) == ["overfitting"]


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"train_acc": [0.1, 0.11, 0.1, 0.12, 0.11], "val_acc": [0.1, 0.1, 0.11, 0.1, 0.1]},
         "barely above chance"),
        ({"train_acc": [0.4, 0.55, 0.62, 0.66, 0.665, 0.668, 0.664],
          "val_acc": [0.4, 0.53, 0.6, 0.63, 0.64, 0.64, 0.645]}, "plateaued at 66.4%"),
        ({"train_loss": [2.31, 2.30, 2.30, 2.29], "val_loss": [2.31, 2.30, 2.30, 2.30]},
         "chance loss ln(10)"),
    ],
    ids=["at-chance", "plateau-below-80", "loss-only-at-chance"],
)
def test_low_train_fit_is_underfitting_with_bigger_model_advice(columns, expected):
    (finding,) = diagnose_fit(_rows(**columns), num_classes=10)
    assert finding.kind == "underfitting" and expected in finding.message
    text = " ".join(finding.suggestions)
    assert "bigger model" in text and "--epochs" in text and "--weight-decay" in text


def test_val_accuracy_still_rising_at_the_end_asks_for_more_epochs():
    history = _rows(
        train_loss=[1.5, 1.0, 0.7, 0.55, 0.45, 0.38],
        train_acc=[0.5, 0.68, 0.78, 0.83, 0.86, 0.89],
        val_loss=[1.4, 1.0, 0.75, 0.62, 0.52, 0.45],
        val_acc=[0.52, 0.67, 0.76, 0.81, 0.84, 0.87],
    )
    (finding,) = diagnose_fit(history, num_classes=10)
    assert finding.kind == "still_improving"
    assert "--epochs 11" in finding.suggestions[0]


def test_a_tied_best_at_the_end_still_counts_as_improving():
    # digits with tinycnn_xs, 6 epochs: accuracy ties at the end while the loss still falls
    history = _rows(
        train_acc=[0.367, 0.825, 0.915, 0.936, 0.947, 0.959],
        val_loss=[2.17, 0.666, 0.386, 0.340, 0.277, 0.268],
        val_acc=[0.201, 0.833, 0.911, 0.929, 0.944, 0.944],
    )
    assert _kinds(diagnose_fit(history, num_classes=10)) == ["still_improving"]


@pytest.mark.parametrize(
    ("val_loss", "expected"),
    [([0.9, 0.6, 1.4, 0.5, 1.6, 0.55, 1.3, 0.6], "oscillates"),
     ([0.9, 0.7, 0.6, float("nan"), None, None], "non-finite at epoch 3")],
    ids=["oscillating", "diverged"],
)
def test_wild_val_loss_is_unstable(val_loss, expected):
    epochs = len(val_loss)
    history = _rows(val_loss=val_loss, train_acc=[0.85] * epochs, val_acc=[0.8] * epochs)
    (finding,) = diagnose_fit(history, num_classes=10)
    assert finding.kind == "unstable" and expected in finding.message
    assert any("--lr" in s for s in finding.suggestions)


def test_converged_run_with_small_gap_is_healthy():
    history = _rows(
        train_loss=[1.2, 0.6, 0.4, 0.3, 0.26, 0.25, 0.25, 0.24],
        train_acc=[0.6, 0.8, 0.87, 0.9, 0.92, 0.925, 0.93, 0.93],
        val_loss=[1.1, 0.6, 0.45, 0.36, 0.33, 0.32, 0.32, 0.325],
        val_acc=[0.62, 0.79, 0.85, 0.88, 0.895, 0.9, 0.9, 0.9],
    )
    (finding,) = diagnose_fit(history, num_classes=10)
    assert finding.kind == "healthy" and finding.suggestions == ()
    assert "gap 3.0 points" in finding.message


def test_short_and_empty_histories():
    assert diagnose_fit([], num_classes=10) == []
    (single,) = diagnose_fit([{"epoch": 0, "train_loss": 1.9, "val_acc": None}], num_classes=10)
    assert single.kind == "healthy" and "too short" in single.message
    (gap,) = diagnose_fit([{"epoch": 0, "train_acc": 0.9, "val_acc": 0.6}], num_classes=10)
    assert gap.kind == "overfitting"


def test_fewer_than_two_classes_is_a_config_error():
    with pytest.raises(ConfigError, match="num_classes"):
        diagnose_fit([{"epoch": 0}], num_classes=1)
