"""Optimiser, learning-rate schedule and transfer-learning parameter groups.

Written here rather than taken from ``timm.optim``/``timm.scheduler`` because we
need three things at once that those helpers do not combine: a lower backbone
learning rate, freezing for linear probes and gradual unfreezing (stage by stage, top
first), and a schedule that is a pure function of the step (so resume is exact and the
gradient-health back-off is a simple multiplier).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lensforge.train.config import TrainConfig

# transfer: probe fine-tunes at most this share of the backbone's stages, from the top (see trainable_stages)
PROBE_STAGE_SHARE = 0.5


def classifier_names(model: nn.Module) -> set[str]:
    """Parameter names of the classification head (timm's ``get_classifier``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float, backbone_scale: float) -> torch.optim.Optimizer:
    """Four groups: {backbone, head} x {decay, no decay}; norms and biases get no weight decay."""
    head = classifier_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((name in head, no_decay), []).append(param)
    param_groups = []
    for (is_head, no_decay), params in sorted(groups.items()):
        scale = 1.0 if is_head else backbone_scale
        param_groups.append({"params": params, "lr": lr * scale, "base_lr": lr * scale,
                             "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999))


def schedule_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Learning-rate multiplier at ``step`` (0-based) for the given schedule."""
    if kind == "constant":
        return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
    if kind == "onecycle":
        # triangular one-cycle: linear up over the first ~25% (or the warm-up), linear down to 0
        peak = max(warmup_steps, int(0.25 * total_steps), 1)
        if step < peak:
            return 0.1 + 0.9 * step / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))
    # cosine with linear warm-up
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[-1]["lr"]


def backbone_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Backbone parameters by stage, in model order (head excluded).

    A stage is a top-level child module, or each child of a top-level ``Sequential`` /
    ``ModuleList`` (timm EfficientNet's ``blocks`` holds all seven stages: unfreezing "the
    top" must mean its last stages, not the whole of ``blocks`` at once).
    """
    head = classifier_names(model)
    groups = []
    for child_name, child in model.named_children():
        parts = (list(child.named_children()) if isinstance(child, (nn.Sequential, nn.ModuleList))
                 else [("", child)])
        for part_name, part in parts:
            prefix = f"{child_name}.{part_name}" if part_name else child_name
            params = [p for n, p in part.named_parameters(prefix=prefix) if n not in head]
            if params:
                groups.append(params)
    return groups


def trainable_stages(mode: str, epoch: int, epochs: int, stages: int) -> int:
    """How many backbone stages (from the top) train in ``epoch`` of ``epochs`` under ``mode``.

    full: all; linear: none; gradual: head only first, then unfreeze from the top over the
    first half of training; probe (the head is already fitted on frozen features, see
    :mod:`lensforge.train.probe`): the top stage(s) from the first epoch on, one more each
    epoch or so over the first half, up to ``PROBE_STAGE_SHARE`` of the stages. A run cut
    short by its time budget has spent its backward passes where they pay most, and the
    early stages (generic edges and textures, at the highest resolution, whose depthwise
    backward passes cost the most on a CPU) are never trained (BENCHMARKS.md).
    """
    if mode == "full":
        return stages
    if mode == "linear":
        return 0
    span = max(1, epochs // 2)
    if mode == "probe":
        most = max(1, math.ceil(stages * PROBE_STAGE_SHARE))
        return min(most, math.ceil(most * (epoch + 1) / span))
    return min(stages, math.ceil(stages * epoch / span))  # gradual


def apply_transfer(model: nn.Module, mode: str, epoch: int, epochs: int) -> int:
    """Freeze/unfreeze for ``mode`` at ``epoch``; returns how many backbone stages train.

    Batch norms of frozen stages are kept in eval mode (see :func:`_frozen_norms_in_eval`).
    """
    groups = backbone_groups(model)
    trainable = trainable_stages(mode, epoch, epochs, len(groups))
    for i, params in enumerate(groups):
        on = i >= len(groups) - trainable
        for p in params:
            p.requires_grad_(on)
    if not getattr(model, "_lensforge_frozen_norms", False):
        model.register_forward_pre_hook(_frozen_norms_in_eval)
        model._lensforge_frozen_norms = True  # once per model
    return trainable


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _frozen_norms_in_eval(model: nn.Module, args: object) -> None:
    """Forward pre-hook: a frozen stage's batch norms use (and keep) their running statistics.

    In train mode they would normalise with each batch's statistics and drift their running
    ones towards the new data, so a "frozen" stage would still change what it computes, and
    a head fitted on its features (the linear probe) would no longer fit them. Measured on
    photo patches at 96 px: validation accuracy after the first fine-tuned epoch 71% with
    train-mode norms vs 86% with frozen ones (probe alone: 79%). A hook because the loop
    calls ``model.train()`` at the start of every epoch; it runs before every forward pass.
    """
    if not model.training:
        return
    for module in model.modules():
        if isinstance(module, _BATCH_NORMS) and module.weight is not None and not module.weight.requires_grad:
            module.eval()
