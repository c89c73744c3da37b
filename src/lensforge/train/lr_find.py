"""``lr_find(cfg)``: the learning-rate range test (Smith 2017, "Cyclical learning rates").

The learning rate grows exponentially from ``min_lr`` to ``max_lr`` over ``steps`` optimizer
steps on the run's real training batches (same model, optimizer, augmentation and label
smoothing as training); the loss is smoothed (EMA) and the test stops when it diverges. The
suggestion is the learning rate where the smoothed loss falls fastest (steepest negative
slope against log-lr), capped at a tenth of the loss minimum's learning rate, fastai's rule
of thumb. Written here because the maintained implementations (fastai, torch-lr-finder) own
their training loops; this one drives ours, so what it measures is what training will do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.errors import UsageError

SMOOTHING = 0.98  # EMA of the loss, as fastai: the raw per-batch loss is too noisy to read
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum


@dataclass
class LrFindResult:
    """The curve (learning rates and smoothed losses) and the suggested peak learning rate."""

    lrs: list[float]
    losses: list[float]
    suggested_lr: float
    min_loss_lr: float
    model: str
    batch_size: int
    path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"lrs": self.lrs, "losses": self.losses, "suggested_lr": self.suggested_lr,
                "min_loss_lr": self.min_loss_lr, "model": self.model, "batch_size": self.batch_size,
                "method": "LR range test (Smith 2017), steepest descent of the EMA-smoothed loss"}


def lr_find(cfg: Any, *, steps: int = 100, min_lr: float = 1e-6, max_lr: float = 1.0,
            out: str | Path | None = None) -> LrFindResult:
    """Run the range test for ``cfg`` (a :class:`~lensforge.train.config.TrainConfig`); nothing is trained for keeps.

    With ``out``, writes ``lr_find.json`` and ``lr_find.png`` (loss against log learning rate,
    the suggestion marked) there.

    Raises:
        UsageError: ``min_lr >= max_lr`` or fewer than 10 steps.
    """
    import torch

    from lensforge.data.sources import open_source
    from lensforge.data.splits import make_splits
    from lensforge.data.table import load_table
    from lensforge.train.augment import policy_for
    from lensforge.train.loop import Batches
    from lensforge.train.optim import build_optimizer
    from lensforge.train.setup import batch_and_lr, build_model, resolve

    if not 0 < min_lr < max_lr:
        raise UsageError(f"lr-find needs 0 < --min-lr < --max-lr, got {min_lr:g} and {max_lr:g}")
    if steps < 10:
        raise UsageError(f"lr-find needs at least 10 steps to draw a curve, not {steps}")
    torch.manual_seed(cfg.seed)
    source = open_source(cfg.data)
    resolved = resolve(cfg, source)
    model, pre = build_model(resolved, len(source.class_names))
    table = load_table(source, pre, on_bad_image=cfg.on_bad_image)
    splits = make_splits(table, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    batch_size, _ = batch_and_lr(cfg, len(splits.train))
    batches = Batches(table, splits.train, batch_size, resolved.device, resolved.channels_last)
    model.to(resolved.device).train()
    optimizer = build_optimizer(model, cfg, min_lr, cfg.backbone_lr_scale if resolved.pretrained else 1.0)
    policy = policy_for(resolved.augment, resolved.image_size, resolved.hflip)
    generator = torch.Generator().manual_seed(cfg.seed)
    lrs, losses = _sweep(model, optimizer, batches, policy, generator, cfg.label_smoothing, steps, min_lr, max_lr)
    suggested, at_min = suggest(lrs, losses)
    result = LrFindResult(lrs, losses, suggested, at_min, resolved.model_name, batch_size)
    if out is not None:
        result.path = _write(result, Path(out))
    return result


def _sweep(model: Any, optimizer: Any, batches: Any, policy: Any, generator: Any, label_smoothing: float,
           steps: int, min_lr: float, max_lr: float) -> tuple[list[float], list[float]]:
    """Train ``steps`` steps at exponentially rising learning rates; (lrs, smoothed losses) until divergence."""
    import torch

    factor = (max_lr / min_lr) ** (1 / (steps - 1))
    lrs, losses, smooth, best = [], [], 0.0, math.inf
    step = 0
    while step < steps:
        order = torch.randperm(len(batches), generator=generator)
        for x, y in batches.iterate(order, policy, generator, drop_last=True):
            lr = min_lr * factor ** step
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("base_lr", min_lr) / min_lr
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            smooth = SMOOTHING * smooth + (1 - SMOOTHING) * value
            debiased = smooth / (1 - SMOOTHING ** (step + 1))
            step += 1
            if not math.isfinite(debiased) or debiased > DIVERGED * best:
                step = steps
                break
            lrs.append(lr)
            losses.append(debiased)
            best = min(best, debiased)
            if step >= steps:
                break
    return lrs, losses


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(suggested lr, lr at the loss minimum): steepest descent, at most a tenth of the minimum's lr."""
    if len(lrs) < 5:
        raise UsageError(f"the loss diverged after {len(lrs)} steps: lower --min-lr")
    log_lr, loss = np.log10(np.asarray(lrs)), np.asarray(losses)
    at_min = int(np.argmin(loss))
    slopes = np.gradient(loss, log_lr)
    steepest = int(np.argmin(slopes[: max(at_min, 1) + 1]))  # only where the loss still falls
    return float(min(lrs[steepest], lrs[at_min] / 10)) if at_min > 0 else float(lrs[0]), float(lrs[at_min])


def _write(result: LrFindResult, out: Path) -> Path:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lensforge.utils.io import atomic_write_bytes, atomic_write_json

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(result.lrs, result.losses, color="#1f5fa8")
    ax.axvline(result.suggested_lr, color="#c0392b", linestyle="--",
               label=f"suggested lr {result.suggested_lr:.2g}")
    ax.set(xscale="log", xlabel="learning rate (log scale)", ylabel="training loss (smoothed)",
           title=f"LR range test: {result.model}, batch {result.batch_size}")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(out / "lr_find.png", buffer.getvalue())
    return atomic_write_json(out / "lr_find.json", result.to_json())
