"""Options, objectives and the search space of `lensforge tune`, checked without training anything."""

from __future__ import annotations

import pytest

from lensforge.errors import ConfigError, UsageError
from lensforge.tune import OBJECTIVES, ChoiceParam, FloatParam, TuneConfig, default_space, parse_duration
from lensforge.tune.space import TINY_MODELS, check_space, image_sizes, suggest


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h", 3600), ("90", 90), ("1.5h", 5400),
                                               ("2M", 120), (45, 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["3x", "m", "-5", "0", "1h30", ""])
def test_bad_durations_name_the_option(text):
    with pytest.raises(UsageError, match="--timeout"):
        parse_duration(text)


def test_objectives_are_a_registry_with_directions():
    assert OBJECTIVES.list() == ["accuracy", "latency_ms", "size_mb"]
    assert OBJECTIVES.get("accuracy").direction == "maximize"
    assert {OBJECTIVES.get(n).direction for n in ("latency_ms", "size_mb")} == {"minimize"}


def test_objectives_from_text_put_accuracy_first():
    cfg = TuneConfig(objectives="latency_ms, accuracy")
    assert cfg.objectives == ("accuracy", "latency_ms") and cfg.multi_objective
    assert not TuneConfig().multi_objective


@pytest.mark.parametrize(("objectives", "message"), [
    ("acuracy", "unknown objective 'acuracy'; did you mean accuracy?"),
    ("accuracy,latency", "did you mean latency_ms?"),
    ("latency_ms", "lacks accuracy"),
    ("accuracy,accuracy", "twice"),
])
def test_bad_objectives(objectives, message):
    with pytest.raises(UsageError, match="--objectives") as raised:
        TuneConfig(objectives=objectives)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_config_bounds_are_one_line_errors():
    from lensforge.train.config import make_config_of

    with pytest.raises(ConfigError, match="trials"):
        make_config_of(TuneConfig, {"trials": 0})
    with pytest.raises(ConfigError, match="pruner"):
        make_config_of(TuneConfig, {"pruner": "sometimes"})


def test_trial_config_layers_study_options_and_params(tmp_path):
    cfg = TuneConfig(data="builtin:digits", model="tinycnn_xs", epochs=3, seed=7, max_train_batches=2,
                     train_options={"batch_size": 32, "lr": 1e-3})
    trial = cfg.trial_config({"lr": 5e-3}, tmp_path / "t")
    assert (trial.model, trial.epochs, trial.seed, trial.max_train_batches) == ("tinycnn_xs", 3, 7, 2)
    assert (trial.batch_size, trial.lr, trial.out) == (32, 5e-3, str(tmp_path / "t"))  # the searched value wins
    with pytest.raises(UsageError, match="epochs"):
        TuneConfig(train_options={"epochs": 5}).trial_config({}, tmp_path / "t")
    with pytest.raises(ConfigError, match="bogus"):
        TuneConfig(train_options={"bogus": 1}).trial_config({}, tmp_path / "t")


def test_default_space_searches_tinycnn_sizes_only_for_small_images_and_auto_model():
    names = [p.name for p in default_space("auto", 32, 32)]
    assert names == ["lr", "weight_decay", "batch_size", "label_smoothing", "augment", "mixup", "cutmix", "model",
                     "image_size"]
    model = next(p for p in default_space("auto", 32, 32) if p.name == "model")
    assert model.choices == TINY_MODELS
    assert "model" not in [p.name for p in default_space("resnet18", 32, 32)]  # a given model stays fixed
    assert "model" not in [p.name for p in default_space("auto", 224, 224)]
    check_space(default_space("auto", 32, 32))  # every parameter is a training option


def test_image_sizes_are_the_default_and_smaller_multiples_of_8():
    assert image_sizes(32) == (16, 24, 32)
    assert image_sizes(16) == (8, 16)
    assert image_sizes(224) == (112, 168, 224)
    assert image_sizes(28) == (16, 24, 28)  # the native side itself, not rounded up to 32


@pytest.mark.parametrize(("space", "message"), [
    ((FloatParam("learning_rate", 1e-3, 1e-2),), "not a training option"),
    ((ChoiceParam("epochs", (1, 2)),), "set by the study"),
    ((FloatParam("lr", 1e-3, 1e-2), FloatParam("lr", 1e-4, 1e-3)), "twice"),
])
def test_bad_spaces(space, message):
    with pytest.raises(UsageError, match=message):
        check_space(space)


def test_suggest_draws_training_options_by_name():
    import optuna

    trial = optuna.trial.FixedTrial({"lr": 2e-3, "augment": "strong", "model": "tinycnn_s"})
    space = (FloatParam("lr", 1e-4, 1e-2, log=True), ChoiceParam("augment", ("none", "strong")),
             ChoiceParam("model", TINY_MODELS))
    assert suggest(trial, space) == {"lr": 2e-3, "augment": "strong", "model": "tinycnn_s"}
