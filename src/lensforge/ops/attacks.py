"""Adversarial attacks in [0, 1] pixel space, robust-accuracy curves and gradient-masking checks.

Attacks perturb images in pixel units of [0, 1] (what a person or a camera can change), not
in the model's normalised input space, so an epsilon of 8/255 means 8 grey levels whatever
the model's mean/std: :class:`PixelSpaceModel` puts the normalisation inside ``forward``.
Every attack draws its randomness from an explicit ``torch.Generator``: a fixed seed gives
the same adversarial images, and training (``adv_train``) can draw from the trainer's own
generator so that a resumed run stays exact.

Registered attacks (``ATTACKS``, ``list_attacks``): ``fgsm`` (Goodfellow et al. 2015),
``pgd-linf`` and ``pgd-l2`` (Madry et al. 2018, random start), ``apgd-ce`` (Croce & Hein
2020, the AutoAttack reference algorithm with the cross-entropy loss) and ``fgsm-rs``
(Wong et al. 2020, "Fast is better than free"; meant for training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lensforge.errors import UsageError
from lensforge.models.normalize import Normalize
from lensforge.registry import Registry

Norm = Literal["linf", "l2"]
AttackFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack: its threat model and the function that runs it.

    ``run(model_px, images01, targets, eps, *, steps, generator, step_size, keep_worst)``
    returns adversarial images in [0, 1]; ``iterative`` attacks should never be weaker
    than FGSM, which :func:`gradient_masking_warnings` checks.
    """

    norm: Norm
    iterative: bool
    run: AttackFn


ATTACKS: Registry[AttackSpec] = Registry("attack")


def register_attack(name: str, norm: Norm, *, iterative: bool) -> Callable[[AttackFn], AttackFn]:
    def add(fn: AttackFn) -> AttackFn:
        ATTACKS.register(name)(AttackSpec(norm=norm, iterative=iterative, run=fn))
        return fn

    return add


def list_attacks(pattern: str = "*") -> list[str]:
    return ATTACKS.list(pattern)


class PixelSpaceModel(nn.Module):
    """``model`` with its input normalisation inside: takes images in [0, 1], returns logits."""

    def __init__(self, model: nn.Module, mean: Sequence[float] | torch.Tensor,
                 std: Sequence[float] | torch.Tensor) -> None:
        super().__init__()
        self.model = model
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.normalize = Normalize([float(v) for v in mean], [float(v) for v in std], pixel_max=1.0).to(device)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images01))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside (BN running stats, no dropout); each submodule's own flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def check_epsilon(eps: float, norm: Norm) -> None:
    """Epsilon in pixel units of [0, 1]: at most 1 for L-inf (any image is reachable), >= 0 for L2."""
    if not np.isfinite(eps):
        raise UsageError(f"epsilon must be a finite number, not {eps}")
    if norm == "linf" and not 0 <= eps <= 1:
        raise UsageError(f"epsilon must be in [0, 1] (L-inf, pixel units of [0, 1] images), not {eps}")
    if norm == "l2" and eps < 0:
        raise UsageError(f"L2 epsilon must be >= 0, not {eps}")


# --- building blocks -------------------------------------------------------------------------


def loss_and_grad(model_px: nn.Module, images01: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy, logits and the loss gradient w.r.t. the images (never the weights).

    A model whose output does not depend differentiably on its input (rounding, detach,
    a lookup) gets an all-zero gradient instead of an error: that *is* gradient masking,
    and the checks below report it.
    """
    x = images01.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model_px(x).float()
        loss = F.cross_entropy(logits, targets, reduction="none")
        grad = None
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    grad = torch.zeros_like(x) if grad is None else grad
    return loss.detach(), logits.detach(), grad.detach()


@torch.no_grad()
def _loss_and_wrong(model_px: nn.Module, images01: torch.Tensor, targets: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model_px(images01).float()
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(1) != targets


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * 3))


def _l2_norm(delta: torch.Tensor) -> torch.Tensor:
    return _per_sample(delta.flatten(1).norm(dim=1))


def project(images01: torch.Tensor, clean01: torch.Tensor, eps: float | torch.Tensor, norm: Norm) -> torch.Tensor:
    """Back into the eps-ball around ``clean01`` and into [0, 1].

    Clipping to [0, 1] after the L2 projection only moves pixels towards the clean image,
    so it can never push the perturbation back out of the ball.
    """
    delta = images01 - clean01
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / (_l2_norm(delta) + 1e-12)).clamp(max=1.0)
    return (clean01 + delta).clamp(0, 1)


def _steepest(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Unit step direction: the sign for L-inf, the normalised gradient for L2."""
    return grad.sign() if norm == "linf" else grad / (_l2_norm(grad) + 1e-12)


def _random_start(clean01: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator) -> torch.Tensor:
    """Uniform in the L-inf cube, or a random direction at a uniform radius in the L2 ball."""
    if norm == "linf":
        delta = (torch.rand(clean01.shape, generator=generator) * 2 - 1) * eps
    else:
        direction = torch.randn(clean01.shape, generator=generator)
        radius = torch.rand(clean01.shape[0], generator=generator) * eps
        delta = direction / (_l2_norm(direction) + 1e-12) * _per_sample(radius)
    return project(clean01 + delta.to(clean01.device), clean01, eps, norm)


class WorstCase:
    """Per sample, the most adversarial input seen: misclassified beats correct, then higher loss.

    Starts from the clean image, so an attack never returns something less adversarial
    than no perturbation at all (an already wrong prediction stays wrong).
    """

    def __init__(self, model_px: nn.Module, clean01: torch.Tensor, targets: torch.Tensor) -> None:
        self.images = clean01.detach().clone()
        self.loss, self.wrong = _loss_and_wrong(model_px, clean01, targets)

    def update(self, images01: torch.Tensor, loss: torch.Tensor, wrong: torch.Tensor) -> None:
        better = (wrong & ~self.wrong) | ((wrong == self.wrong) & (loss > self.loss))
        self.images = torch.where(_per_sample(better), images01.detach(), self.images)
        self.loss = torch.where(better, loss, self.loss)
        self.wrong = self.wrong | wrong


# --- the attacks --------------------------------------------------------------------------------


@register_attack("fgsm", "linf", iterative=False)
def fgsm(model_px: nn.Module, clean01: torch.Tensor, targets: torch.Tensor, eps: float, *,
         generator: torch.Generator, keep_worst: bool = True, **_: Any) -> torch.Tensor:
    """One signed-gradient step of size eps (Goodfellow et al. 2015)."""
    _, _, grad = loss_and_grad(model_px, clean01, targets)
    adversarial = (clean01 + eps * grad.sign()).clamp(0, 1)
    if not keep_worst:
        return adversarial
    worst = WorstCase(model_px, clean01, targets)
    worst.update(adversarial, *_loss_and_wrong(model_px, adversarial, targets))
    return worst.images


def _pgd(model_px: nn.Module, clean01: torch.Tensor, targets: torch.Tensor, eps: float, norm: Norm, *,
         steps: int, restarts: int, step_size: float | None, generator: torch.Generator,
         keep_worst: bool) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy from a random start (Madry et al. 2018).

    With ``keep_worst`` every iterate of every restart competes per sample (see
    :class:`WorstCase`); without it (training) the last iterate of the last restart is
    returned, as in the paper.
    """
    step = 2.5 * eps / steps if step_size is None else step_size  # Madry et al.: reach the rim from anywhere
    worst = WorstCase(model_px, clean01, targets) if keep_worst else None
    x = clean01
    for _ in range(max(1, restarts)):
        x = _random_start(clean01, eps, norm, generator)
        for _ in range(steps):
            loss, logits, grad = loss_and_grad(model_px, x, targets)
            if worst is not None:
                worst.update(x, loss, logits.argmax(1) != targets)
            x = project(x + step * _steepest(grad, norm), clean01, eps, norm)
        if worst is not None:
            worst.update(x, *_loss_and_wrong(model_px, x, targets))
    return worst.images if worst is not None else x


@register_attack("pgd-linf", "linf", iterative=True)
def pgd_linf(model_px: nn.Module, clean01: torch.Tensor, targets: torch.Tensor, eps: float, *,
             steps: int = 10, restarts: int = 1, step_size: float | None = None,
             generator: torch.Generator, keep_worst: bool = True, **_: Any) -> torch.Tensor:
    return _pgd(model_px, clean01, targets, eps, "linf", steps=steps, restarts=restarts, step_size=step_size,
                generator=generator, keep_worst=keep_worst)


@register_attack("pgd-l2", "l2", iterative=True)
def pgd_l2(model_px: nn.Module, clean01: torch.Tensor, targets: torch.Tensor, eps: float, *,
           steps: int = 10, restarts: int = 1, step_size: float | None = None,
           generator: torch.Generator, keep_worst: bool = True, **_: Any) -> torch.Tensor:
    return _pgd(model_px, clean01, targets, eps, "l2", steps=steps, restarts=restarts, step_size=step_size,
                generator=generator, keep_worst=keep_worst)


@register_attack("fgsm-rs", "linf", iterative=False)
def fgsm_random_start(model_px: nn.Module, clean01: torch.Tensor, targets: torch.Tensor, eps: float, *,
                      step_size: float | None = None, generator: torch.Generator, keep_worst: bool = True,
                      **_: Any) -> torch.Tensor:
    """FGSM from a uniform random start with a 1.25 eps step (Wong et al. 2020), for fast adversarial training."""
    return _pgd(model_px, clean01, targets, eps, "linf", steps=1, restarts=1,
                step_size=1.25 * eps if step_size is None else step_size, generator=generator,
                keep_worst=keep_worst)


def _apgd_start(clean01: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    # The reference scales uniform noise so its largest coordinate sits on the rim of the cube.
    t = (torch.rand(clean01.shape, generator=generator) * 2 - 1).to(clean01.device)
    t = t / (_per_sample(t.flatten(1).abs().amax(1)) + 1e-12)
    return (clean01 + eps * t).clamp(0, 1)


def _apgd_single_run(model_px: nn.Module, clean01: torch.Tensor, targets: torch.Tensor, eps: float,
                     steps: int, generator: torch.Generator, rho: float = 0.75) -> torch.Tensor:
    """One run of APGD-CE, L-inf (Croce & Hein 2020, Algorithm 1, as in the AutoAttack reference).

    Momentum 0.75; step size starts at 2 eps and halves per sample at checkpoints where
    the loss rose in at most ``rho`` of the steps since the last one, or where the best
    loss did not improve and the step was not halved last time; after halving, the
    search restarts from the best point. Checkpoint spacing starts at 22% of the steps and
    shrinks by 3% down to 6%. Returns the last misclassified iterate where one was found,
    otherwise the highest-loss one.
    """
    n = clean01.shape[0]
    interval, min_interval, shrink = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    x = _apgd_start(clean01, eps, generator)
    loss, logits, grad = loss_and_grad(model_px, x, targets)
    x_best, loss_best, grad_best = x.clone(), loss.clone(), grad.clone()
    x_fooling, fooled = x.clone(), logits.argmax(1) != targets
    step = torch.full((n, 1, 1, 1), 2.0 * eps, device=clean01.device)
    x_prev, since_check = x.clone(), 0
    # Zero-initialised like the reference, whose first check also compares step 0 with row -1 (still 0).
    loss_history = torch.zeros(steps, n, device=clean01.device)
    loss_best_last_check, halved_last_check = loss_best.clone(), torch.ones(n, dtype=torch.bool, device=x.device)
    for i in range(steps):
        momentum = 0.75 if i > 0 else 1.0
        z = project(x + step * grad.sign(), clean01, eps, "linf")
        x_prev, x = x, project(x + momentum * (z - x) + (1 - momentum) * (x - x_prev), clean01, eps, "linf")
        loss, logits, grad = loss_and_grad(model_px, x, targets)
        wrong = logits.argmax(1) != targets
        x_fooling, fooled = torch.where(_per_sample(wrong), x, x_fooling), fooled | wrong
        improved = loss > loss_best
        x_best = torch.where(_per_sample(improved), x, x_best)
        grad_best = torch.where(_per_sample(improved), grad, grad_best)
        loss_best = torch.where(improved, loss, loss_best)
        loss_history[i] = loss
        since_check += 1
        if since_check < interval:
            continue
        rises = sum((loss_history[i - c] > loss_history[i - c - 1]).float() for c in range(interval))
        halve = (rises <= interval * rho) | (~halved_last_check & (loss_best_last_check >= loss_best))
        halved_last_check, loss_best_last_check = halve, loss_best.clone()
        step = torch.where(_per_sample(halve), step / 2, step)
        x, grad = torch.where(_per_sample(halve), x_best, x), torch.where(_per_sample(halve), grad_best, grad)
        interval, since_check = max(interval - shrink, min_interval), 0
    return torch.where(_per_sample(fooled), x_fooling, x_best)


@register_attack("apgd-ce", "linf", iterative=True)
def apgd_ce(model_px: nn.Module, clean01: torch.Tensor, targets: torch.Tensor, eps: float, *,
            steps: int = 10, restarts: int = 1, generator: torch.Generator, keep_worst: bool = True,
            **_: Any) -> torch.Tensor:
    """Auto-PGD with the cross-entropy loss; restarts keep the worst case per sample."""
    worst = WorstCase(model_px, clean01, targets)
    for _ in range(max(1, restarts)):
        candidate = _apgd_single_run(model_px, clean01, targets, eps, steps, generator)
        worst.update(candidate, *_loss_and_wrong(model_px, candidate, targets))
    return worst.images


# --- the public entry points ----------------------------------------------------------------


def attack(model_px: nn.Module, images01: torch.Tensor, targets: torch.Tensor, name: str, eps: float, *,
           steps: int = 10, restarts: int = 1, seed: int = 0, generator: torch.Generator | None = None,
           step_size: float | None = None, keep_worst: bool = True) -> torch.Tensor:
    """Adversarial versions of ``images01`` (N, C, H, W in [0, 1]) against ``model_px`` (takes [0, 1]).

    The model is attacked in eval mode (its flags restored after) and only input
    gradients are computed, so weights and their ``.grad`` are untouched. Randomness
    comes from ``generator`` if given (training), else from a fresh one seeded with ``seed``.
    """
    spec = ATTACKS.get(name)
    check_epsilon(eps, spec.norm)
    if steps < 1 or restarts < 1:
        raise UsageError(f"steps and restarts must be at least 1, not {steps} and {restarts}")
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    clean01, targets = images01.detach().float(), targets.detach().long()
    if eps == 0:
        return clean01.clone()
    with eval_mode(model_px):
        adversarial = spec.run(model_px, clean01, targets, float(eps), steps=steps, restarts=restarts,
                               step_size=step_size, generator=generator, keep_worst=keep_worst)
    return adversarial.detach()


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _batches(images_uint8: np.ndarray, targets: np.ndarray, batch_size: int, device: torch.device
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(images_uint8), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images_uint8[start:start + batch_size])).to(device)
        y = torch.from_numpy(np.asarray(targets[start:start + batch_size])).long().to(device)
        yield x.float() / 255, y


def adversarial_examples(model: nn.Module, images_uint8: np.ndarray, targets: np.ndarray, preprocess: Any,
                         name: str, eps: float, *, steps: int = 10, restarts: int = 1, batch_size: int = 256,
                         seed: int = 0) -> np.ndarray:
    """Adversarial images (float32 (N, C, H, W) in [0, 1]) crafted on ``model``, e.g. for :func:`transfer_accuracy`."""
    model_px = PixelSpaceModel(model, preprocess.mean, preprocess.std)
    generator = torch.Generator().manual_seed(seed)
    out = [attack(model_px, x, y, name, eps, steps=steps, restarts=restarts, generator=generator).cpu().numpy()
           for x, y in _batches(images_uint8, targets, batch_size, _device_of(model))]
    return np.concatenate(out).astype(np.float32, copy=False)


def _accuracy(model_px: nn.Module, images_uint8: np.ndarray, targets: np.ndarray, batch_size: int,
              transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> float:
    """Accuracy on ``transform(images01, targets)`` (the clean images when None)."""
    correct = 0
    for x, y in _batches(images_uint8, targets, batch_size, _device_of(model_px)):
        if transform is not None:
            x = transform(x, y)
        with torch.no_grad(), eval_mode(model_px):
            correct += int((model_px(x).argmax(1) == y).sum())
    return correct / max(1, len(targets))


def _zero_gradient_fraction(model_px: nn.Module, images_uint8: np.ndarray, targets: np.ndarray,
                            batch_size: int) -> float:
    """Share of correctly classified clean inputs whose loss gradient is exactly zero or not finite."""
    dead, correct = 0, 0
    for x, y in _batches(images_uint8, targets, batch_size, _device_of(model_px)):
        with eval_mode(model_px):
            _, logits, grad = loss_and_grad(model_px, x, y)
        right = logits.argmax(1) == y
        flat = grad.flatten(1)
        is_dead = (flat.abs().amax(1) == 0) | ~torch.isfinite(flat).all(1)
        dead, correct = dead + int((is_dead & right).sum()), correct + int(right.sum())
    return dead / max(1, correct)


def _random_noise_accuracy(model_px: nn.Module, images_uint8: np.ndarray, targets: np.ndarray, eps: float,
                           batch_size: int, seed: int) -> float:
    """Accuracy under random +-eps sign noise: an attack that does worse than this is broken or masked."""
    generator = torch.Generator().manual_seed(seed)

    def noise(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        signs = torch.randint(0, 2, x.shape, generator=generator).to(x.device, x.dtype) * 2 - 1
        return (x + eps * signs).clamp(0, 1)

    return _accuracy(model_px, images_uint8, targets, batch_size, noise)


@dataclass(frozen=True)
class CurveSettings:
    steps: int
    restarts: int
    batch_size: int
    seed: int


def _robust_accuracy(model_px: nn.Module, images_uint8: np.ndarray, targets: np.ndarray, name: str, eps: float,
                     settings: CurveSettings) -> float:
    generator = torch.Generator().manual_seed(settings.seed)  # each point reproducible on its own

    def craft(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return attack(model_px, x, y, name, eps, steps=settings.steps, restarts=settings.restarts,
                      generator=generator)

    return _accuracy(model_px, images_uint8, targets, settings.batch_size, craft)


SANITY_EPSILON = 0.5  # L-inf: half the pixel range; a working iterative attack fools (almost) everything here


def robust_accuracy_curve(model: nn.Module, images_uint8: np.ndarray, targets: np.ndarray, preprocess: Any, *,
                          attacks: Sequence[str] = ("fgsm", "pgd-linf", "apgd-ce"),
                          epsilons: Sequence[float] = (0, 1 / 255, 2 / 255, 4 / 255, 8 / 255),
                          l2_epsilons: Sequence[float] = (0, 0.1, 0.25, 0.5, 1.0),
                          steps: int = 10, restarts: int = 1, batch_size: int = 256, seed: int = 0,
                          sanity_check: bool = True,
                          progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Robust accuracy per attack and epsilon, plus the gradient-masking checks (JSON-friendly).

    L-inf attacks use ``epsilons``, L2 attacks ``l2_epsilons`` (pixel units of [0, 1]).
    With ``sanity_check`` each iterative L-inf attack also runs once at eps 0.5, where
    it should fool nearly every input (Carlini et al. 2019: "unbounded attacks must
    succeed"); that point is kept apart from the curve under ``"sanity"``.
    ``progress(done, total)`` is called after each evaluated point.
    """
    specs = {name: ATTACKS.get(name) for name in attacks}
    for spec in specs.values():
        for eps in epsilons if spec.norm == "linf" else l2_epsilons:
            check_epsilon(eps, spec.norm)
    if len(images_uint8) != len(targets) or len(targets) == 0:
        raise UsageError(f"need as many targets as images (and at least one): {len(images_uint8)} vs {len(targets)}")
    settings = CurveSettings(steps, restarts, batch_size, seed)
    model_px = PixelSpaceModel(model, preprocess.mean, preprocess.std)
    sanity_names = [n for n, s in specs.items() if sanity_check and s.norm == "linf" and s.iterative]
    total = sum(len(epsilons if s.norm == "linf" else l2_epsilons) for s in specs.values()) + len(sanity_names)
    done = 0

    def point(name: str, eps: float) -> float:
        nonlocal done
        value = clean if eps == 0 else _robust_accuracy(model_px, images_uint8, targets, name, eps, settings)
        done += 1
        if progress is not None:
            progress(done, total)
        return value

    clean = _accuracy(model_px, images_uint8, targets, batch_size)
    curves = {}
    for name, spec in specs.items():
        eps_list = [float(e) for e in (epsilons if spec.norm == "linf" else l2_epsilons)]
        curves[name] = {"norm": spec.norm, "epsilons": eps_list,
                        "robust_accuracy": [point(name, eps) for eps in eps_list]}
    sanity = {name: {"epsilon": SANITY_EPSILON, "robust_accuracy": point(name, SANITY_EPSILON)}
              for name in sanity_names}
    largest = max((float(e) for e in epsilons), default=0.0)
    diagnostics = {"zero_gradient_fraction": _zero_gradient_fraction(model_px, images_uint8, targets, batch_size)}
    if largest > 0:
        diagnostics["random_noise"] = {"epsilon": largest, "accuracy": _random_noise_accuracy(
            model_px, images_uint8, targets, largest, batch_size, seed)}
    result = {"attacks": curves, "clean_accuracy": clean, "sanity": sanity, "diagnostics": diagnostics,
              "settings": {**settings.__dict__, "num_samples": int(len(targets)), "attacks": list(attacks)}}
    result["warnings"] = gradient_masking_warnings(result)
    return result


# --- gradient-masking checks (Carlini et al. 2019, "On evaluating adversarial robustness") -----


def format_epsilon(eps: float, norm: str = "linf") -> str:
    """8/255 for L-inf values on the grey-level grid, plain numbers otherwise."""
    levels = eps * 255
    if norm == "linf" and eps > 0 and abs(levels - round(levels)) < 1e-6:
        return f"{round(levels)}/255"
    return f"{eps:g}"


def gradient_masking_warnings(curves: dict[str, Any], tolerance: float | None = None) -> list[str]:
    """Plain-sentence warnings when the numbers look like gradient masking rather than robustness.

    The cheap checks of Carlini et al. 2019: (a) robust accuracy must not rise with
    epsilon; (b) iterative attacks must not do worse than one FGSM step; (c) an attack at
    eps 0.5 (L-inf) must fool nearly every input; (d) robust accuracy must not exceed
    clean accuracy; (e) the attack must hurt more than random noise of the same size;
    (f) the loss gradient must not be exactly zero for many inputs. ``tolerance`` (a
    fraction of samples) absorbs the attacks' randomness; by default 2% or 2 samples.
    """
    n = int(curves.get("settings", {}).get("num_samples", 0) or 0)
    tol = tolerance if tolerance is not None else max(0.02, 2 / n if n else 0.0)
    attacks = curves.get("attacks", {})
    warnings = []
    for name, curve in attacks.items():
        warnings += _non_monotone(name, curve, tol)
        warnings += _above_clean(name, curve, curves.get("clean_accuracy"), tol)
    warnings += _weaker_than_fgsm(attacks, tol)
    warnings += _unbounded_fails(curves.get("sanity", {}))
    warnings += _weaker_than_noise(attacks, curves.get("diagnostics", {}).get("random_noise"), tol)
    dead = curves.get("diagnostics", {}).get("zero_gradient_fraction")
    if dead is not None and dead > 0.1:
        warnings.append(f"{dead:.0%} of correctly classified inputs have an exactly zero (or non-finite) loss "
                        "gradient: gradient attacks cannot move them (saturated softmax, rounding or another "
                        "non-differentiable step); the robust accuracies are likely overestimates.")
    return warnings


def _non_monotone(name: str, curve: dict[str, Any], tol: float) -> list[str]:
    out, lowest = [], float("inf")
    for eps, acc in zip(curve["epsilons"], curve["robust_accuracy"], strict=True):
        if acc > lowest + tol:
            out.append(f"{name}: robust accuracy rises to {acc:.1%} at eps {format_epsilon(eps, curve['norm'])} "
                       f"after {lowest:.1%} at a smaller eps; a larger budget can never help the model, "
                       "so the attack is failing (possible gradient masking).")
        lowest = min(lowest, acc)
    return out


def _above_clean(name: str, curve: dict[str, Any], clean: float | None, tol: float) -> list[str]:
    if clean is None:
        return []
    points = zip(curve["epsilons"], curve["robust_accuracy"], strict=True)
    return [f"{name}: robust accuracy {acc:.1%} at eps {format_epsilon(eps, curve['norm'])} is above the clean "
            f"accuracy {clean:.1%}; the attack makes the model more accurate, so it is not working."
            for eps, acc in points if eps > 0 and acc > clean + tol]


def _weaker_than_fgsm(attacks: dict[str, Any], tol: float) -> list[str]:
    if "fgsm" not in attacks:
        return []
    base = dict(zip(attacks["fgsm"]["epsilons"], attacks["fgsm"]["robust_accuracy"], strict=True))
    out = []
    for name, curve in attacks.items():
        spec = ATTACKS.get(name) if name in ATTACKS else None
        if spec is None or not spec.iterative or curve["norm"] != "linf":
            continue
        for eps, acc in zip(curve["epsilons"], curve["robust_accuracy"], strict=True):
            if eps in base and acc > base[eps] + tol:
                out.append(f"{name}: robust accuracy {acc:.1%} at eps {format_epsilon(eps)} is higher than "
                           f"single-step FGSM's {base[eps]:.1%}; an iterative attack should be at least as "
                           "strong (possible gradient masking or a too small step size).")
    return out


def _unbounded_fails(sanity: dict[str, Any], max_accuracy: float = 0.1) -> list[str]:
    return [f"{name}: robust accuracy is still {p['robust_accuracy']:.1%} at eps {format_epsilon(p['epsilon'])}, "
            "where any image can be turned into a grey one; a working attack fools almost every input "
            "(possible gradient masking)."
            for name, p in sanity.items() if p["robust_accuracy"] > max_accuracy]


def _weaker_than_noise(attacks: dict[str, Any], noise: dict[str, Any] | None, tol: float) -> list[str]:
    if not noise:
        return []
    out = []
    for name, curve in attacks.items():
        for eps, acc in zip(curve["epsilons"], curve["robust_accuracy"], strict=True):
            if curve["norm"] == "linf" and eps == noise["epsilon"] and acc > noise["accuracy"] + tol:
                out.append(f"{name}: robust accuracy {acc:.1%} at eps {format_epsilon(eps)} is higher than "
                           f"under random +-eps noise ({noise['accuracy']:.1%}); the attack does worse than "
                           "chance, so its gradients are not informative (possible gradient masking).")
    return out


# --- transfer to another predictor (e.g. the ONNX bundle) -----------------------------------


def quantise_uint8(images01: np.ndarray | torch.Tensor) -> np.ndarray:
    """[0, 1] floats to uint8 grey levels: round to the nearest level, then clip."""
    if isinstance(images01, torch.Tensor):
        images01 = images01.detach().cpu().numpy()
    return np.clip(np.rint(np.asarray(images01, dtype=np.float64) * 255), 0, 255).astype(np.uint8)


def transfer_accuracy(adversarial_images01: np.ndarray | torch.Tensor, targets: np.ndarray,
                      predict_uint8: Callable[[np.ndarray], Any], *, clean_images_uint8: np.ndarray | None = None,
                      batch_size: int = 256) -> dict[str, Any]:
    """Accuracy of another predictor (uint8 (N, C, H, W) -> logits) on adversarial images made elsewhere.

    The images are quantised to uint8 first, as any deployed input is: a perturbation
    smaller than half a grey level (eps < 0.5/255) disappears, and every pixel moves by
    up to half a level, so the result is for the quantised attack, not the float one.
    With ``clean_images_uint8`` the result also says how much perturbation survived.
    """
    quantised = quantise_uint8(adversarial_images01)
    targets = np.asarray(targets)
    if len(quantised) != len(targets):
        raise UsageError(f"need one target per image: {len(quantised)} images, {len(targets)} targets")
    predictions = [np.asarray(predict_uint8(quantised[s:s + batch_size])).argmax(1)
                   for s in range(0, len(quantised), batch_size)]
    predicted = np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)
    result: dict[str, Any] = {"transfer_accuracy": float((predicted == targets).mean()) if len(targets) else 0.0,
                              "num_samples": int(len(targets))}
    if clean_images_uint8 is not None:
        change = np.abs(quantised.astype(np.int16) - np.asarray(clean_images_uint8).astype(np.int16))
        per_image = change.reshape(len(change), -1).max(1) if len(change) else np.zeros(0)
        result["perturbed_fraction"] = float((per_image > 0).mean()) if len(per_image) else 0.0
        result["max_linf_levels"] = int(per_image.max()) if len(per_image) else 0  # in grey levels of 255
    return result


__all__ = ["ATTACKS", "AttackSpec", "PixelSpaceModel", "adversarial_examples", "attack", "check_epsilon",
           "eval_mode", "gradient_masking_warnings", "list_attacks", "register_attack", "robust_accuracy_curve",
           "transfer_accuracy"]
