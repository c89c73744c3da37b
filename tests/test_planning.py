"""Time-budget planning: durations, plans that fit, budgets too small, autopilot's summary."""

from __future__ import annotations

import json

import pytest
from helpers import run

from lensforge.errors import UsageError
from lensforge.planning import BudgetTooSmall, parse_duration, plan_run
from lensforge.train import resolve_config


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1h30m", 5400), ("1.5h", 5400),
                                           ("45", 45), ("2min", 120), (30, 30), (None, None)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "5x", "0", "-3"])
def test_bad_durations_name_the_option(text):
    with pytest.raises(UsageError, match="--time-budget"):
        parse_duration(text)


def _cfg(tmp_path, **kw):
    return resolve_config(None, data="builtin:digits", model="tinycnn_xs", image_size=8, out=str(tmp_path / "r"), **kw)


def test_a_plan_fits_its_budget_and_its_epochs_cap(tmp_path):
    generous = plan_run(_cfg(tmp_path, epochs=5), budget_s=3600)
    assert generous.epochs == 5 and generous.budget_given
    assert (generous.num_train, generous.num_val, generous.num_test) == (1257, 270, 270)
    tight_budget = generous.pilot_s + generous.data_s + generous.after_s + 2.5 * generous.epoch_s
    tight = plan_run(_cfg(tmp_path, epochs=500), budget_s=tight_budget)
    assert 1 <= tight.epochs <= 500
    # the plan's own arithmetic: what it plans fits, one more epoch would not
    assert tight.total_s <= tight.budget_s + 1e-6
    assert tight.total_s + tight.epoch_s > tight.budget_s or tight.epochs == 500
    assert tight.train_limit_s >= tight.train_s
    assert "planned" in tight.describe() and "tinycnn_xs at 8 px" in tight.describe()


def test_without_a_budget_the_default_is_stated_and_bounded(tmp_path):
    plan = plan_run(_cfg(tmp_path, epochs=3))
    assert not plan.budget_given and 60 <= plan.budget_s <= 300
    assert plan.epochs == 3 and "default budget" in plan.describe()


def test_a_budget_too_small_for_one_epoch_says_what_would_fit(tmp_path):
    with pytest.raises(BudgetTooSmall, match="would fit one epoch") as caught:
        plan_run(_cfg(tmp_path), budget_s=0.01)
    assert caught.value.exit_code == 3


def test_autopilot_cli_refuses_a_tiny_budget_in_one_line(tmp_path):
    result = run("autopilot", "--time-budget", "1s", "--out", str(tmp_path / "a"), "-q")
    assert result.returncode == 3, result.stderr
    assert "too small" in result.stderr and "Traceback" not in result.stderr
    bad = run("autopilot", "--time-budget", "soon", "--out", str(tmp_path / "b"), "-q")
    assert bad.returncode == 2 and "--time-budget" in bad.stderr


def test_autopilot_records_its_budget_and_plan(tmp_path):
    from lensforge.autopilot import autopilot

    result = autopilot(out=tmp_path / "a", time_budget_s=600, epochs=3, model="tinycnn_xs", image_size=8,
                       show_progress=False, guardrails=False)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["budget_s"] == 600 and summary["plan"]["budget_given"]
    assert summary["plan"]["epochs"] == 3 and 1 <= summary["epochs_run"] <= 3
    config = (tmp_path / "a" / "config.yaml").read_text()
    assert "time_limit_s:" in config and "epochs: 3" in config
    assert any("budget" in line for line in result.summary_lines())


def test_small_images_train_at_their_native_size():
    from lensforge.train.setup import auto_image_size

    assert auto_image_size("tinycnn_s", 28, None) == 28  # not upsampled to 32
    assert auto_image_size("tinycnn_s", 8, None) == 16  # three pooling stages need some room
    assert auto_image_size("tinycnn_s", 200, None) == 64


def test_batch_size_follows_the_data_size_so_short_runs_take_enough_steps():
    from lensforge.train import resolve_config
    from lensforge.train.setup import MIN_STEPS_PER_EPOCH, auto_batch_size, batch_and_lr

    assert auto_batch_size(60_000) == 128 and auto_batch_size(None) == 128
    assert auto_batch_size(2_100) == 32  # builtin:shapes' 2,100 training images: 65 steps an epoch, not 16
    assert auto_batch_size(100) == 32  # never below 32: the per-image cost rises on a CPU
    for n in (1_700, 3_300, 6_500, 12_800):
        batch = auto_batch_size(n)
        assert n / batch >= MIN_STEPS_PER_EPOCH and (batch == 128 or n / (2 * batch) < MIN_STEPS_PER_EPOCH)
    assert batch_and_lr(resolve_config(None), 2_100) == (32, pytest.approx(1e-3))  # AdamW lr ~ sqrt(batch)
    assert batch_and_lr(resolve_config(None, batch_size=64, lr=0.01), 2_100) == (64, 0.01)  # given: kept
    assert batch_and_lr(resolve_config(None, batch_size=64), 20)[0] == 20  # never more than the split


def test_tinycnn_trains_channels_last_on_cpu_and_timm_models_keep_their_layout():
    from lensforge.data.sources import open_source
    from lensforge.train import resolve_config
    from lensforge.train.setup import resolve

    source = open_source("builtin:digits")
    assert resolve(resolve_config(None, model="tinycnn_s", device="cpu"), source).channels_last
    assert not resolve(resolve_config(None, model="tinycnn_s", device="cpu", channels_last="off"), source).channels_last
    assert not resolve(resolve_config(None, model="resnet18", device="cpu"), source).channels_last
    assert not resolve(resolve_config(None, model="tinycnn_s", device="cpu"), source).amp  # bf16: see BENCHMARKS


def test_train_cli_plans_its_epochs_and_says_so(tmp_path):
    result = run("train", "--data", "builtin:digits", "--model", "tinycnn_xs", "--image-size", "8",
                 "--time-budget", "10m", "--epochs", "2", "--out", str(tmp_path / "t"), "-q")
    assert result.returncode == 0, result.stderr
    assert "planned 2 epochs of tinycnn_xs at 8 px" in result.stderr
    assert "time_limit_s:" in (tmp_path / "t" / "config.yaml").read_text()
    small = run("train", "--data", "builtin:digits", "--time-budget", "0.5s", "--out", str(tmp_path / "u"), "-q")
    assert small.returncode == 3 and "too small" in small.stderr
