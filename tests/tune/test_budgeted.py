"""autopilot --tune's arithmetic and verdict: how the budget is split, when a tuned config is adopted.

Plans are built by hand here (no pilot); the real tuned autopilot run is in tests/cli/test_autopilot_tune.py.
"""

from __future__ import annotations

import pytest

from lensforge.planning import Plan
from lensforge.tune.budgeted import (
    RECHECK_OVERHEAD_S,
    RECHECK_RUNS,
    STUDY_OVERHEAD_S,
    TRIAL_OVERHEAD_S,
    TUNE_SHARE,
    decide,
    share_budget,
)
from lensforge.tune.config import DEFAULT_TRIAL_EPOCHS


def _plan(budget_s: float, *, given: bool, epochs: int = 30, steps_per_epoch: int = 10,
          seconds_per_step: float = 0.2) -> Plan:
    """A plan of ``epochs`` epochs of 2 s each (10 steps x 0.2 s, no validation images), 10 s of overheads."""
    epoch_s = steps_per_epoch * seconds_per_step
    return Plan(budget_s=budget_s, budget_given=given, model="tinycnn_s", image_size=28, batch_size=128,
                epochs=epochs, steps_per_epoch=steps_per_epoch, seconds_per_step=seconds_per_step,
                seconds_per_image_forward=0.0, num_train=1280, num_val=0, num_test=0, data_s=3.0, pilot_s=2.0,
                train_s=epochs * epoch_s, after_s=5.0)


def test_a_given_budget_is_split_in_half_of_its_training_time():
    plan = _plan(600, given=True, epochs=200)
    share = share_budget(plan, trials=10, max_epochs=200)
    assert share.budget_s == 600  # the budget stays what was asked for
    assert share.tune_s == pytest.approx((600 - 2 - 3 - 5) * TUNE_SHARE)
    # the longest trials with which all of them and the re-check fit the share (here 9 epochs: 233 s / 24 s)
    room = share.tune_s - STUDY_OVERHEAD_S - 10 * TRIAL_OVERHEAD_S - RECHECK_RUNS * RECHECK_OVERHEAD_S
    assert share.trial_epochs == int(room // ((10 + RECHECK_RUNS) * plan.epoch_s)) == 9
    assert 0 < share.timeout_s < share.tune_s
    assert share.to_json()["tune"] + share.to_json()["final"] == pytest.approx(600, abs=0.1)
    assert "half of the budget's training time" in share.describe(10, seed=0)


def test_without_a_budget_the_final_training_keeps_its_default_length():
    plan = _plan(80, given=False, epochs=30)
    share = share_budget(plan, trials=4, max_epochs=30)
    assert share.tune_s == pytest.approx(plan.train_limit_s)
    assert share.budget_s == pytest.approx(80 + plan.train_limit_s)
    assert "budget grows to" in share.describe(4, seed=0)


@pytest.mark.parametrize("max_epochs, budget_s, expected", [
    (30, 10_000, DEFAULT_TRIAL_EPOCHS),  # plenty of time: trials are still short
    (3, 10_000, 3),  # never longer than the run's own --epochs
    (30, 20, 1),  # no time at all: one epoch each, and the timeout cuts the study short
])
def test_trial_epochs_are_bounded(max_epochs, budget_s, expected):
    share = share_budget(_plan(budget_s, given=True, epochs=max_epochs), trials=5, max_epochs=max_epochs)
    assert share.trial_epochs == expected
    if budget_s == 20:
        assert share.trials_that_fit() < 5 and "the rest are not started" in share.describe(5, seed=0)


@pytest.mark.parametrize("default, tuned, adopted, words", [
    (0.80, 0.85, True, "at least as good"),
    (0.80, 0.80, True, "at least as good"),  # a tie keeps the study's choice
    (0.80, 0.79, False, "worse than the default"),
    (0.64, None, False, "failed on seed 1"),
    (None, 0.70, True, "default configuration failed"),
])
def test_the_tuned_config_is_adopted_only_when_it_holds_on_the_second_seed(default, tuned, adopted, words):
    recheck = {"seed": 1, "default": default, "tuned": tuned, "default_error": None if default else "diverged",
               "tuned_error": None if tuned else "diverged"}
    verdict, reason = decide(recheck)
    assert verdict is adopted and words in reason
