"""``train(cfg) -> TrainResult``: the training loop.

One epoch = a seeded permutation of the in-memory uint8 table, batched
augmentation, optionally the batch's adversarial version (``adv_train``),
forward/backward, gradient-health check, clipping, a step of the optimiser at
the scheduled learning rate, and EMA. Each epoch ends with
validation, ``metrics.jsonl``, the best weights and a crash-safe checkpoint.
All randomness of epoch *e* comes from generators seeded by (seed, e) (and the
rank, for a data-parallel rank's augmentation), and the global RNG states are
checkpointed, so ``--resume`` continues exactly. With several processes
(:mod:`lensforge.train.distributed`) each rank trains on its shard of the epoch's
order and the forward pass runs through DDP.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lensforge.data.table import ImageTable
from lensforge.errors import LensforgeError
from lensforge.models.normalize import Normalize
from lensforge.train.augment import AugmentPolicy, augment_batch, augment_uint8
from lensforge.train.config import TrainConfig
from lensforge.train.distributed import DistContext
from lensforge.train.health import GradientHealthMonitor, HealthAction
from lensforge.train.optim import schedule_factor, set_lr

MAX_RESTORES = 3  # restores from the last good checkpoint before we give up on a diverging run


class TrainingDiverged(LensforgeError):
    """Non-finite values persisted after repeated restores and learning-rate back-off."""


@dataclass
class LoopState:
    """Mutable state of the loop that a checkpoint must carry."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    lr_scale: float = 1.0  # multiplied down by the health monitor's back-off
    best_val_acc: float = -1.0
    best_epoch: int = 0
    restores: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    planned_steps: int | None = None  # the schedule's length when a time limit shortened it (detection)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Batches:
    """Normalised, augmented batches from an :class:`ImageTable` split, on ``device``."""

    table: ImageTable
    indices: np.ndarray
    batch_size: int
    device: torch.device
    channels_last: bool = False
    rank: int = 0  # data-parallel ranks: each iterates its own shard of every epoch's order
    world_size: int = 1

    def __post_init__(self) -> None:
        self.images = torch.from_numpy(self.table.images[self.indices])
        self.targets = torch.from_numpy(self.table.targets[self.indices])
        pre = self.table.preprocess
        self.mean = torch.tensor(pre.mean).view(1, -1, 1, 1).to(self.device)
        self.std = torch.tensor(pre.std).view(1, -1, 1, 1).to(self.device)
        # augmentation works on [0, 1] pixels: normalise those, as the bundle's graph does uint8 ones
        self.normalize = Normalize(pre.mean, pre.std, pixel_max=1.0).to(self.device)

    def __len__(self) -> int:
        return len(self.indices)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised batch back to pixels in [0, 1] (what a teacher with other preprocessing needs)."""
        return x * self.std + self.mean

    def shard_size(self) -> int:
        """Images this rank iterates per epoch (all of them with one process)."""
        return -(-len(self) // self.world_size)

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's part of an epoch's ``order``: every world_size-th index from ``rank``.

        As ``DistributedSampler``: the order is first padded by wrapping to a multiple of
        world_size, so every rank takes the same number of batches (DDP needs each rank
        to step together); the shards are disjoint apart from those few repeats.
        """
        if self.world_size == 1:
            return order
        padded = torch.cat([order, order[:self.shard_size() * self.world_size - len(order)]])
        return padded[self.rank::self.world_size]

    def drop_last(self, mixup: bool) -> bool:
        """Drop a ragged last training batch: mixup needs even batches, and tiny ones add noise."""
        return mixup or self.shard_size() > self.batch_size * 4

    def num_batches(self, drop_last: bool) -> int:
        size = self.shard_size()
        n = size // self.batch_size if drop_last else -(-size // self.batch_size)
        return max(1, n)

    def iterate(self, order: torch.Tensor | None = None, policy: AugmentPolicy | None = None,
                generator: torch.Generator | None = None, drop_last: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.arange(len(self)) if order is None else order
        for b in range(self.num_batches(drop_last)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            augment = policy is not None and generator is not None
            pixels = augment_uint8(self.images[idx], policy, generator) if augment else self.images[idx]
            x = pixels.to(self.device, non_blocking=True).float().div_(255)
            if augment:
                x = augment_batch(x, policy, generator)
            x = self.normalize(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.targets[idx].to(self.device, non_blocking=True)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Batches, amp: bool) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing) and accuracy of ``model`` on ``batches``."""
    model.eval()
    total_loss, correct = 0.0, 0
    for x, y in batches.iterate():
        with autocast(batches.device, amp):
            logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return total_loss / max(1, len(batches)), correct / max(1, len(batches))


ADV_ATTACKS = {"pgd": "pgd-linf", "fgsm-rs": "fgsm-rs"}  # adv_train value -> registered attack


@dataclass(frozen=True)
class Adversary:
    """Replaces a normalised training batch by its adversarial version (adversarial training).

    Attacks run in [0, 1] pixel space (:mod:`lensforge.ops.attacks`), so ``eps``
    means grey levels whatever the normalisation. Choices, and why:

    * The model is attacked in eval mode (BN running statistics, no dropout), as the
      Madry lab's ``robustness`` library and TRADES do: crafting in train mode would feed
      every attack step's batch into the BN running statistics. The flags are restored.
    * The whole batch is replaced (100% adversarial, as Madry et al. and Wong et al.
      train), not mixed 50/50 with clean images as in Goodfellow et al. 2015: the mix
      buys back clean accuracy at the cost of robustness, and doubles the forward pass.
    * Validation (and so the best epoch) stays on clean images; robust accuracy is
      measured afterwards with ``lensforge.ops.attacks``.
    * The last iterate is used, not the highest-loss one, as in both papers (for
      FGSM-RS that keeps catastrophic overfitting visible instead of hiding it).
    * Random starts come from the epoch's generator, so ``--resume`` stays exact.
    """

    attack: str  # a registered L-inf attack: "pgd-linf" or "fgsm-rs"
    eps: float  # pixel units of [0, 1]
    steps: int
    mean: torch.Tensor  # (1, C, 1, 1), on the training device
    std: torch.Tensor

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        from lensforge.ops.attacks import PixelSpaceModel, attack

        pixels = (x.float() * self.std + self.mean).clamp(0, 1)
        adversarial = attack(PixelSpaceModel(model, self.mean, self.std), pixels, y, self.attack, self.eps,
                             steps=self.steps, generator=generator, keep_worst=False)
        out = (adversarial - self.mean) / self.std
        return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
            memory_format=torch.channels_last) else out


def make_adversary(cfg: TrainConfig, batches: Batches) -> Adversary | None:
    if cfg.adv_train == "none":
        return None
    return Adversary(ADV_ATTACKS[cfg.adv_train], cfg.adv_eps, cfg.adv_steps, batches.mean, batches.std)


@dataclass
class StepContext:
    """What one optimisation step needs (explicit, not the whole trainer)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    monitor: GradientHealthMonitor
    cfg: TrainConfig
    state: LoopState
    total_steps: int
    warmup_steps: int
    amp: bool
    device: torch.device
    mixup: Any = None
    ema: Any = None
    teacher: Any = None  # callable: un-normalised [0, 1] batch -> teacher logits
    unnormalize: Any = None  # callable: normalised batch -> [0, 1] batch, for the teacher
    adversary: Adversary | None = None  # adversarial training: batch -> adversarial batch
    dist: DistContext = field(default_factory=DistContext)  # this process's rank in a data-parallel job
    ddp: nn.Module | None = None  # the DDP wrapper of ``model`` the forward pass runs through (several ranks)


VERDICTS = (HealthAction.OK, HealthAction.SKIP, HealthAction.RESTORE)  # in rising severity


def train_step(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, epoch: int,
               generator: torch.Generator | None = None) -> tuple[HealthAction, float, int]:
    """(Adversarial batch,) forward, backward, health check, clip and step; returns (action, loss, correct).

    With an adversary, loss and accuracy are those on the adversarial batch.
    """
    hard = y
    if ctx.adversary is not None:  # crafted on hard labels, before mixup mixes them
        generator = generator if generator is not None else torch.Generator().manual_seed(ctx.state.step)
        with autocast(ctx.device, ctx.amp):
            x = ctx.adversary(ctx.model, x, y, generator)
    if ctx.mixup is not None:
        x, y = ctx.mixup(x, y)
    net = ctx.ddp if ctx.ddp is not None else ctx.model
    with autocast(ctx.device, ctx.amp):
        logits = net(x)
        if ctx.teacher is not None:
            with torch.no_grad():
                teacher_logits = ctx.teacher(ctx.unnormalize(x)).float()
            loss = ctx.criterion(logits.float(), y, teacher_logits)
        else:
            loss = ctx.criterion(logits.float(), y)
    loss.backward()
    action = ctx.monitor.after_backward(loss.detach(), step=ctx.state.step, epoch=epoch)
    # DDP averaged the gradients, so a non-finite one is seen on every rank; agreeing on the
    # verdict as well makes sure no rank steps while another skips or restores
    action = VERDICTS[ctx.dist.max_int(VERDICTS.index(action))]
    if action is not HealthAction.OK:
        ctx.optimizer.zero_grad(set_to_none=True)
        return action, float("nan"), 0
    if ctx.cfg.clip_grad_norm > 0:
        clip_to_norm(ctx.model, ctx.monitor.total_norm, ctx.cfg.clip_grad_norm)
        ctx.monitor.note_clipped(ctx.monitor.total_norm, ctx.cfg.clip_grad_norm)
    factor = schedule_factor(ctx.state.step, ctx.total_steps, ctx.warmup_steps, ctx.cfg.schedule)
    set_lr(ctx.optimizer, factor * ctx.state.lr_scale)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.ema is not None:
        ctx.ema.update(ctx.model, step=ctx.state.step)
    ctx.state.step += 1
    return action, float(loss.detach()), int((logits.argmax(1) == hard).sum())


def clip_to_norm(model: nn.Module, total_norm: float, max_norm: float) -> None:
    """Clip with the norm the health monitor already computed (saves a second pass over the grads)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch >= 2.6
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(total_norm))
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}


def handle_unhealthy(ctx: StepContext, action: HealthAction, good: dict[str, Any]) -> None:
    """Back off the learning rate; on RESTORE also reload the last good weights."""
    ctx.state.lr_scale *= ctx.monitor.lr_backoff
    if action is HealthAction.RESTORE:
        ctx.state.restores += 1
        if ctx.state.restores > MAX_RESTORES:
            raise TrainingDiverged(
                f"training diverged: non-finite loss or gradients persisted after {MAX_RESTORES} restores "
                f"and lr scaled by {ctx.state.lr_scale:.2g}; lower --lr or check the data")
        ctx.model.load_state_dict(good["model"])
        ctx.optimizer.load_state_dict(good["optimizer"])
        ctx.monitor.note_action("restore", f"restored the last good weights (epoch {good['epoch']}), "
                                           f"lr scaled to x{ctx.state.lr_scale:.3g}")
    else:
        ctx.monitor.note_action("lr_backoff", f"skipped step {ctx.state.step}, lr scaled to x{ctx.state.lr_scale:.3g}")


def run_epoch(ctx: StepContext, batches: Batches, policy: AugmentPolicy, epoch: int,
              good: dict[str, Any], on_batch: Any = None) -> dict[str, float]:
    """Train one epoch; returns train loss, accuracy and throughput."""
    ctx.model.train()
    generator = torch.Generator().manual_seed(ctx.cfg.seed * 1_000_003 + epoch)
    order = batches.shard(torch.randperm(len(batches), generator=generator))  # the same order on every rank
    if batches.rank:  # other ranks augment differently; rank 0 keeps the 1-process stream
        generator = torch.Generator().manual_seed(rank_seed(ctx.cfg.seed, epoch, batches.rank))
    drop_last = batches.drop_last(ctx.mixup is not None)
    seen, correct, loss_sum, counted = 0, 0, 0.0, 0
    start = time.perf_counter()
    for i, (x, y) in enumerate(batches.iterate(order, policy, generator, drop_last)):
        if ctx.cfg.max_train_batches and i >= ctx.cfg.max_train_batches:
            break
        action, loss, hits = train_step(ctx, x, y, epoch, generator)
        if action is not HealthAction.OK:
            handle_unhealthy(ctx, action, good)
        else:
            loss_sum, counted, correct = loss_sum + loss * len(y), counted + len(y), correct + hits
        seen += len(y)
        if on_batch is not None:  # this rank's loss and accuracy; images/s of all ranks
            on_batch(loss_sum / max(1, counted), correct / max(1, counted),
                     seen * ctx.dist.world_size / (time.perf_counter() - start))
    loss_sum, counted, correct, seen = ctx.dist.sum([loss_sum, counted, correct, seen])
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / max(1, counted), "train_acc": correct / max(1, counted),
            "images_per_s": seen / max(elapsed, 1e-9), "epoch_time_s": elapsed}


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of a data-parallel rank's augmentation in ``epoch``: well mixed, so no two (epoch, rank) streams meet."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
