"""Optimiser, learning-rate schedule and transfer-learning parameter groups.

Written here rather than taken from ``timm.optim``/``timm.scheduler`` because we
need three things at once that those helpers do not combine: a lower backbone
learning rate, freezing for linear probes and gradual unfreezing, and a
schedule that is a pure function of the step (so resume is exact and the
gradient-health back-off is a simple multiplier).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lensforge.train.config import TrainConfig


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
    """Backbone parameters by top-level child module, in model order (head excluded)."""
    head = classifier_names(model)
    groups = []
    for child_name, child in model.named_children():
        params = [p for n, p in child.named_parameters(prefix=child_name) if n not in head]
        if params:
            groups.append(params)
    return groups


def apply_transfer(model: nn.Module, mode: str, epoch: int, epochs: int) -> int:
    """Freeze/unfreeze for ``mode`` at ``epoch``; returns how many backbone groups train."""
    groups = backbone_groups(model)
    if mode == "full":
        trainable = len(groups)
    elif mode == "linear":
        trainable = 0
    else:  # gradual: head only first, then unfreeze from the top over the first half of training
        span = max(1, epochs // 2)
        trainable = min(len(groups), math.ceil(len(groups) * epoch / span))
    for i, params in enumerate(groups):
        on = i >= len(groups) - trainable
        for p in params:
            p.requires_grad_(on)
    return trainable
