"""Gradient health monitor: real gradients from tiny models, no timing."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from lensforge.errors import ArtifactError, ConfigError
from lensforge.train.health import GradientHealthMonitor, HealthAction, layer_groups


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def _deep_sigmoid_mlp(depth: int = 20, width: int = 32) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    layers.append(nn.Linear(width, 4))
    return nn.Sequential(*layers)


def _train(
    model: nn.Module, monitor: GradientHealthMonitor, steps: int, *, lr: float = 0.05,
    loss_scale: dict[int, float] | None = None, clip_norm: float = 1.0,
) -> list[HealthAction]:
    """A training loop used the way the trainer uses the monitor; returns the verdicts."""
    torch.manual_seed(0)
    inputs = torch.randn(32, 3, 8, 8) if isinstance(model[0], nn.Conv2d) else torch.randn(32, 32)
    targets = torch.randint(0, 4, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    actions = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss = loss * (loss_scale or {}).get(step, 1.0)
        loss.backward()
        action = monitor.after_backward(loss.detach(), step=step, epoch=0)
        actions.append(action)
        if action is HealthAction.OK:
            total_norm = torch.tensor(monitor.total_norm)  # already measured: no second pass
            nn.utils.clip_grads_with_norm_(model.parameters(), clip_norm, total_norm)
            monitor.note_clipped(monitor.total_norm, clip_norm)
            optimizer.step()
    return actions


def test_layer_groups_follow_timm_resnet_stages_in_order():
    model = timm.create_model("resnet18", num_classes=10)
    expected = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert list(layer_groups(model)) == expected


def test_layer_groups_split_a_dominant_trunk_and_a_lone_wrapper():
    model = timm.create_model("efficientnet_b0", num_classes=10)
    groups = list(layer_groups(model))
    assert groups[:2] == ["conv_stem", "bn1"] and groups[-1] == "classifier"
    assert [g for g in groups if g.startswith("blocks")] == [f"blocks.{i}" for i in range(7)]

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 1))

    assert list(layer_groups(Wrapper())) == ["net.0", "net.2", "net.3"]


def test_healthy_training_has_no_events_and_says_healthy():
    model = _small_cnn()
    monitor = GradientHealthMonitor(model, every_n_steps=5, warmup_steps=10)
    actions = _train(model, monitor, 30)
    assert set(actions) == {HealthAction.OK}
    assert monitor.events == []
    (sentence,) = monitor.diagnosis()
    assert sentence.startswith("gradients healthy")
    history = monitor.history
    assert history["step"] == [0, 5, 10, 15, 20, 25]
    assert len(history["total"]) == 6 and all(v > 0 for v in history["total"])
    assert list(history["layers"]) == ["0", "1", "3", "4", "8"]
    assert all(len(v) == 6 for v in history["layers"].values())


def test_deep_sigmoid_mlp_reports_one_vanishing_event_on_early_layers():
    torch.manual_seed(0)
    model = _deep_sigmoid_mlp()
    monitor = GradientHealthMonitor(model, every_n_steps=1, vanish_patience=3)
    _train(model, monitor, 6)
    vanishing = [e for e in monitor.events if e.kind == "vanishing"]
    assert len(vanishing) == 1  # one per episode, not one per check
    event = vanishing[0]
    assert event.layer.startswith("0..") and event.step == 2
    assert event.value < 1e-3
    assert "since step 0" in event.message
    assert any("sigmoid" in s for s in monitor.diagnosis())


def test_loss_spike_is_an_exploding_event_naming_a_layer_and_the_clip():
    model = _small_cnn()
    monitor = GradientHealthMonitor(model, every_n_steps=5, warmup_steps=8)
    actions = _train(model, monitor, 16, loss_scale={12: 1e4})
    assert actions[12] is HealthAction.OK  # clipping handles it
    (event,) = monitor.events
    assert event.kind == "exploding" and event.step == 12
    assert event.layer in monitor.layer_names
    assert "clipped to 1" in event.message and "vs median" in event.message
    (sentence,) = monitor.diagnosis()
    assert "one-off" in sentence


def test_recurring_explosions_are_counted_once_logged_and_advise_lower_lr():
    model = _small_cnn()
    monitor = GradientHealthMonitor(model, every_n_steps=5, warmup_steps=8)
    _train(model, monitor, 20, loss_scale={10: 1e4, 13: 1e4, 16: 1e4})
    assert [e.step for e in monitor.events if e.kind == "exploding"] == [10]
    assert any("exploded on 3 step(s)" in s and "lower the learning rate" in s
               for s in monitor.diagnosis())


def test_nan_loss_skips_the_step_and_names_the_first_layer():
    model = _small_cnn()
    monitor = GradientHealthMonitor(model, every_n_steps=5, warmup_steps=5)
    actions = _train(model, monitor, 10, loss_scale={6: float("nan")})
    assert actions[6] is HealthAction.SKIP
    assert actions[7:] == [HealthAction.OK] * 3
    (event,) = monitor.events
    assert event.kind == "nonfinite_loss" and event.action == "skip"
    assert event.layer == "0" and "first non-finite gradients in layer 0" in event.message
    assert any("non-finite" in s for s in monitor.diagnosis())
    json.dumps(monitor.to_json(), allow_nan=False)


def test_persistent_nan_asks_for_a_restore_after_max_consecutive():
    model = _small_cnn()
    monitor = GradientHealthMonitor(model, max_consecutive_nonfinite=3, warmup_steps=5)
    nan_steps = {step: float("nan") for step in range(4, 10)}
    actions = _train(model, monitor, 12, loss_scale=nan_steps)
    skip, restore, ok = HealthAction.SKIP, HealthAction.RESTORE, HealthAction.OK
    assert actions[4:] == [skip, skip, restore, skip, skip, restore, ok, ok]
    monitor.note_action("restore", "restored checkpoint epoch 0")
    assert monitor.events[-1].action == "loop" and monitor.events[-1].step == 11
    assert any("2 checkpoint restore(s)" in s for s in monitor.diagnosis())


def test_nonfinite_gradient_names_the_earliest_bad_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    monitor = GradientHealthMonitor(model)
    model(torch.randn(3, 4)).sum().backward()
    model[3].weight.grad[0, 0] = float("inf")
    model[2].bias.grad[1] = float("nan")
    assert monitor.after_backward(torch.tensor(1.0), step=7) is HealthAction.SKIP
    (event,) = monitor.events
    assert (event.kind, event.layer, event.step) == ("nonfinite_grad", "2", 7)


def test_state_dict_round_trips_through_json_and_keeps_counting():
    model = _small_cnn()
    monitor = GradientHealthMonitor(model, every_n_steps=2, warmup_steps=4)
    _train(model, monitor, 10, loss_scale={8: 1e4})
    state = json.loads(json.dumps(monitor.state_dict(), allow_nan=False))

    resumed = GradientHealthMonitor(model, every_n_steps=2, warmup_steps=4)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert resumed.to_json() == json.loads(json.dumps(monitor.to_json()))

    model.zero_grad()
    logits = model(torch.randn(4, 3, 8, 8))
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert resumed.after_backward(torch.tensor(1.0)) is HealthAction.OK
    assert resumed.history["step"][-1] == 10  # continues from the saved step


def test_state_from_another_model_is_refused():
    state = GradientHealthMonitor(_small_cnn()).state_dict()
    other = GradientHealthMonitor(_deep_sigmoid_mlp(depth=3))
    with pytest.raises(ArtifactError, match="layers"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "option", [{"every_n_steps": 0}, {"explode_factor": 1.0}, {"vanish_ratio": 2.0},
               {"lr_backoff": 0.0}, {"warmup_steps": 100, "window": 50}],
)
def test_bad_options_are_config_errors(option):
    with pytest.raises(ConfigError, match=next(iter(option))):
        GradientHealthMonitor(_small_cnn(), **option)


def test_frozen_layers_are_grouped_and_skipped_until_they_get_gradients():
    model = _small_cnn()
    for param in model[0].parameters():
        param.requires_grad_(False)
    monitor = GradientHealthMonitor(model, every_n_steps=1)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert monitor.after_backward(torch.tensor(1.0), step=0) is HealthAction.OK
    assert monitor.history["layers"]["0"] == [None]  # frozen: no gradient, not "vanishing"
    assert monitor.history["layers"]["8"][0] > 0
    assert monitor.events == []



@pytest.mark.parametrize(("clip_factor", "reported"), [(2.0, False), (10.0, True)])
def test_clipping_is_reported_only_when_it_shrinks_most_steps_a_lot(clip_factor, reported):
    model = _small_cnn()
    monitor = GradientHealthMonitor(model, every_n_steps=1)
    inputs, targets = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    for step in range(12):
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        monitor.after_backward(torch.tensor(1.0), step=step)
        monitor.note_clipped(monitor.total_norm, monitor.total_norm / clip_factor)
    clipping = [s for s in monitor.diagnosis() if "clipped on 100% of steps" in s]
    assert bool(clipping) is reported
