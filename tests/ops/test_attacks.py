from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lensforge.data.preprocess import Preprocess
from lensforge.errors import UsageError
from lensforge.ops.attacks import (
    ATTACKS,
    PixelSpaceModel,
    adversarial_examples,
    attack,
    gradient_masking_warnings,
    robust_accuracy_curve,
    transfer_accuracy,
)

GREY = Preprocess(input_size=(8, 8), channels=1, mean=(0.5,), std=(0.25,))


def _bars(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4 classes of 1x8x8 images: a faint bar (+40 grey levels) in one of four places, on noise."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 4, n)
    images = rng.integers(0, 90, (n, 1, 8, 8))
    for i, t in enumerate(targets):
        if t < 2:
            images[i, 0, 1 + 4 * t: 3 + 4 * t, :] += 40
        else:
            images[i, 0, :, 1 + 4 * (t - 2): 3 + 4 * (t - 2)] += 40
    return images.clip(0, 255).astype(np.uint8), targets


@pytest.fixture(scope="module")
def bars_model():
    """A tiny CNN trained for a few dozen steps on the bars (clean accuracy ~100%)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 16, 4))
    images, targets = _bars(512, seed=0)
    x = (torch.from_numpy(images).float() / 255 - 0.5) / 0.25
    y = torch.from_numpy(targets)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        idx = torch.arange(step * 64, (step + 1) * 64) % 512
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    test_images, test_targets = _bars(128, seed=1)
    return model, test_images, test_targets


def _linear_model() -> nn.Module:
    """Two-class linear model on 1x4x4 inputs: its exact robust accuracy is known in closed form."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.mul_(3)
    return model.eval()


def _linear_data(model: nn.Module, n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Pixels in [0.3, 0.7] (so eps <= 0.3 never meets the [0, 1] box); targets = the model's own labels."""
    rng = np.random.default_rng(2)
    images = rng.integers(77, 179, (n, 1, 4, 4)).astype(np.uint8)
    with torch.no_grad():
        px = PixelSpaceModel(model, GREY.mean, GREY.std)
        logits = px(torch.from_numpy(images).float() / 255)
    targets = logits.argmax(1).numpy()
    margin = (logits[:, 1] - logits[:, 0]).abs().numpy()
    w = (model[1].weight[1] - model[1].weight[0]).detach() / GREY.std[0]  # d margin / d pixel
    return images, targets, margin, float(w.abs().sum()), float(w.norm())


@pytest.mark.parametrize("name", ["fgsm", "pgd-linf", "apgd-ce"])
def test_linf_attacks_reach_the_exact_robust_accuracy_of_a_linear_model(name):
    model = _linear_model()
    images, targets, margin, l1, _ = _linear_data(model)
    for eps in (0.005, 0.02, 0.04):
        expected = float((margin > eps * l1).mean())  # the best L-inf attack lowers the margin by eps * ||w||_1
        curve = robust_accuracy_curve(model, images, targets, GREY, attacks=[name], epsilons=[eps],
                                      sanity_check=False)
        assert curve["attacks"][name]["robust_accuracy"][0] == pytest.approx(expected, abs=1 / 200)
        assert 0.1 < expected < 0.95  # the check is not vacuous


def test_fgsm_rs_is_a_weaker_single_step():
    """Wong et al.'s step (random start + 1.25 eps) need not reach the corner: between optimum and clean."""
    model = _linear_model()
    images, targets, margin, l1, _ = _linear_data(model)
    eps = 0.02
    curve = robust_accuracy_curve(model, images, targets, GREY, attacks=["fgsm-rs"], epsilons=[eps],
                                  sanity_check=False)
    assert float((margin > eps * l1).mean()) <= curve["attacks"]["fgsm-rs"]["robust_accuracy"][0] < 1.0


def test_pgd_l2_approaches_the_exact_l2_robust_accuracy():
    model = _linear_model()
    images, targets, margin, _, l2 = _linear_data(model)
    eps = 0.08
    expected = float((margin > eps * l2).mean())
    curve = robust_accuracy_curve(model, images, targets, GREY, attacks=["pgd-l2"], l2_epsilons=[eps], steps=20)
    measured = curve["attacks"]["pgd-l2"]["robust_accuracy"][0]
    assert 0.1 < expected < 0.95
    assert expected - 1 / 200 <= measured <= expected + 0.05  # no attack beats the optimum; PGD gets close


@pytest.mark.parametrize("name", ATTACKS.list())
def test_perturbations_stay_in_the_ball_and_in_range(name, bars_model):
    model, images, targets = bars_model
    px = PixelSpaceModel(model, GREY.mean, GREY.std)
    x = torch.from_numpy(images[:64]).float() / 255
    y = torch.from_numpy(targets[:64])
    eps = 8 / 255 if ATTACKS.get(name).norm == "linf" else 0.5
    adv = attack(px, x, y, name, eps, steps=5, restarts=2)
    delta = (adv - x).flatten(1)
    assert adv.min() >= 0 and adv.max() <= 1
    if ATTACKS.get(name).norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    assert delta.abs().max() > 0  # it did move
    assert all(p.grad is None for p in model.parameters())  # no gradient leaked into the weights


def test_attacks_lower_accuracy_and_iterative_beat_fgsm(bars_model):
    model, images, targets = bars_model
    eps_list = (0, 4 / 255, 8 / 255, 16 / 255, 32 / 255)
    curve = robust_accuracy_curve(model, images, targets, GREY, epsilons=eps_list, steps=10)
    assert curve["clean_accuracy"] > 0.9
    fgsm = curve["attacks"]["fgsm"]["robust_accuracy"]
    for name in ("fgsm", "pgd-linf", "apgd-ce"):
        acc = curve["attacks"][name]["robust_accuracy"]
        assert acc[0] == curve["clean_accuracy"]  # eps 0 changes nothing
        assert acc[-1] < curve["clean_accuracy"] - 0.3
        assert all(b <= a + 0.02 for a, b in zip(acc, acc[1:]))  # (near-)monotone
    for name in ("pgd-linf", "apgd-ce"):
        assert all(it <= fg + 1 / 128 for it, fg in zip(curve["attacks"][name]["robust_accuracy"], fgsm))
    assert curve["sanity"]["pgd-linf"]["robust_accuracy"] < 0.1
    assert curve["warnings"] == []  # a plain model raises no masking flag
    assert curve["settings"]["num_samples"] == 128


def test_same_seed_same_images_other_seed_other_images(bars_model):
    model, images, targets = bars_model
    a = adversarial_examples(model, images[:32], targets[:32], GREY, "pgd-linf", 8 / 255, steps=3, seed=5)
    b = adversarial_examples(model, images[:32], targets[:32], GREY, "pgd-linf", 8 / 255, steps=3, seed=5)
    c = adversarial_examples(model, images[:32], targets[:32], GREY, "pgd-linf", 8 / 255, steps=3, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_attack_restores_train_mode_and_zero_eps_is_identity(bars_model):
    model, images, targets = bars_model
    px = PixelSpaceModel(model, GREY.mean, GREY.std)
    x = torch.from_numpy(images[:8]).float() / 255
    model.train()
    try:
        assert torch.equal(attack(px, x, torch.from_numpy(targets[:8]), "apgd-ce", 0.0), x)
        attack(px, x, torch.from_numpy(targets[:8]), "pgd-linf", 4 / 255, steps=2)
        assert model.training and model[1].training
    finally:
        model.eval()


@pytest.mark.parametrize(("name", "eps", "message"), [
    ("fgsm", -0.1, r"epsilon must be in \[0, 1\]"),
    ("pgd-linf", 1.5, r"epsilon must be in \[0, 1\]"),
    ("pgd-l2", -0.1, "L2 epsilon must be >= 0"),
    ("pgd-linfinity", 0.1, "did you mean pgd-linf"),
])
def test_bad_epsilon_or_name_is_a_usage_error(bars_model, name, eps, message):
    model, images, targets = bars_model
    px = PixelSpaceModel(model, GREY.mean, GREY.std)
    with pytest.raises(UsageError, match=message):
        attack(px, torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), name, eps)
    with pytest.raises(UsageError, match=message):
        robust_accuracy_curve(model, images, targets, GREY, attacks=[name], epsilons=[eps], l2_epsilons=[eps])


class Saturated(nn.Module):
    """Logits x 1e4: the softmax saturates and the cross-entropy gradient underflows to exactly 0."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * 1e4


class Rounded(nn.Module):
    """Input rounded to 4 levels before the model: gradients are 0 almost everywhere."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 2) / 2)


@pytest.mark.parametrize("wrapper", [Saturated, Rounded])
def test_gradient_masked_models_are_flagged(bars_model, wrapper):
    model, images, targets = bars_model
    masked = wrapper(model).eval()
    curve = robust_accuracy_curve(masked, images, targets, GREY, attacks=["fgsm", "pgd-linf"],
                                  epsilons=(0, 8 / 255, 32 / 255), steps=5)
    text = " ".join(curve["warnings"])
    assert "zero (or non-finite) loss gradient" in text
    assert "pgd-linf: robust accuracy is still" in text and "eps 0.5" in text  # the unbounded check


def test_warning_rules_on_hand_made_curves():
    curves = {
        "clean_accuracy": 0.9,
        "attacks": {
            "fgsm": {"norm": "linf", "epsilons": [0, 2 / 255, 8 / 255], "robust_accuracy": [0.9, 0.5, 0.2]},
            "pgd-linf": {"norm": "linf", "epsilons": [0, 2 / 255, 8 / 255], "robust_accuracy": [0.9, 0.6, 0.95]},
        },
        "diagnostics": {"random_noise": {"epsilon": 8 / 255, "accuracy": 0.85}, "zero_gradient_fraction": 0.0},
        "settings": {"num_samples": 1000},
    }
    warnings = gradient_masking_warnings(curves)
    assert any("pgd-linf: robust accuracy rises to 95.0% at eps 8/255" in w for w in warnings)  # (a)
    assert any("higher than single-step FGSM's 50.0%" in w and "2/255" in w for w in warnings)  # (b)
    assert any("above the clean accuracy" in w for w in warnings)  # (d)
    assert any("random +-eps noise" in w for w in warnings)  # (e)
    curves["attacks"]["pgd-linf"]["robust_accuracy"] = [0.9, 0.45, 0.1]
    assert gradient_masking_warnings(curves) == []


def test_transfer_quantises_and_tiny_perturbations_vanish(bars_model):
    model, images, targets = bars_model

    def predict_uint8(batch: np.ndarray) -> np.ndarray:  # stands in for the ONNX bundle
        with torch.no_grad():
            return PixelSpaceModel(model, GREY.mean, GREY.std)(torch.from_numpy(batch).float() / 255).numpy()

    strong = adversarial_examples(model, images, targets, GREY, "pgd-linf", 16 / 255, steps=10)
    result = transfer_accuracy(strong, targets, predict_uint8, clean_images_uint8=images)
    curve = robust_accuracy_curve(model, images, targets, GREY, attacks=["pgd-linf"], epsilons=[16 / 255],
                                  sanity_check=False)
    assert result["transfer_accuracy"] == pytest.approx(curve["attacks"]["pgd-linf"]["robust_accuracy"][0],
                                                        abs=0.05)
    assert result["perturbed_fraction"] > 0.9 and result["max_linf_levels"] <= 16
    tiny = adversarial_examples(model, images, targets, GREY, "fgsm", 0.2 / 255)  # under half a grey level
    result = transfer_accuracy(tiny, targets, predict_uint8, clean_images_uint8=images)
    assert result["perturbed_fraction"] == 0.0
    assert result["transfer_accuracy"] == pytest.approx(curve["clean_accuracy"])
