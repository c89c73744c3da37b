"""Training configuration: one frozen, validated pydantic model.

Filled in layers (defaults <- ``--config FILE`` <- CLI flags); unknown keys and
wrong types fail with a one-line message; the resolved config is written to
``RUN/config.yaml`` and can be read back with ``lensforge train --config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lensforge.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class TrainConfig(BaseModel):
    """Everything that decides a training run. "auto" values are resolved from data and model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = "builtin:digits"
    model: str = "auto"
    pretrained: str | None = None  # path (.safetensors/.pth), "package" (EfficientNet-Lite0) or "hub"
    out: str = "runs/train"
    image_size: int | None = Field(None, ge=8, le=1024)  # pixels; None = from model/data
    channels: Literal["auto", 1, 3] = "auto"

    epochs: int = Field(30, ge=1, le=10_000)
    # None = from the data size: enough optimizer steps per epoch for short runs (train/setup.py auto_batch_size)
    batch_size: int | None = Field(None, ge=1, le=65_536)
    lr: float | None = Field(None, gt=0, le=10)  # None = 2e-3 x sqrt(batch/128) for AdamW, 0.1 x batch/128 for SGD
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.05, ge=0, le=1)  # not applied to norms and biases
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "onecycle", "constant"] = "onecycle"
    warmup_epochs: float = Field(1.0, ge=0, le=1000)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # light/strong: random warps; augmix, randaugment, trivialaugment, corruptions: a pixel op + the light warp
    augment: Literal["auto", "none", "light", "strong", "augmix", "randaugment", "trivialaugment",
                     "corruptions"] = "auto"
    hflip: Literal["auto", "on", "off"] = "auto"  # auto: off for data whose classes flip (digits)
    mixup: float = Field(0.0, ge=0, le=10)  # mixup alpha; 0 = off
    cutmix: float = Field(0.0, ge=0, le=10)  # cutmix alpha; 0 = off
    ema: bool = False
    ema_decay: float = Field(0.998, gt=0, lt=1)
    clip_grad_norm: float = Field(2.0, ge=0)  # 0 = no clipping
    early_stopping: int = Field(8, ge=0)  # epochs without val improvement; 0 = off

    teacher: str | None = None  # run or bundle to distil from (knowledge distillation)
    distill_alpha: float = Field(0.5, ge=0, le=1)  # weight of the teacher's soft targets in the loss
    distill_temperature: float = Field(4.0, gt=0, le=100)  # softmax temperature for soft targets

    adv_train: Literal["none", "pgd", "fgsm-rs"] = "none"  # pgd: Madry et al. 2018; fgsm-rs: Wong et al. 2020
    adv_eps: float = Field(8 / 255, ge=0, le=1)  # L-inf budget in pixel units of [0, 1] images
    adv_steps: int = Field(7, ge=1, le=100)  # PGD steps (step size 2.5 eps / steps); fgsm-rs takes one

    # probe: fit the head on frozen features first, then fine-tune top stages first (train/probe.py)
    transfer: Literal["auto", "full", "linear", "gradual", "probe"] = "auto"
    backbone_lr_scale: float = Field(0.1, gt=0, le=1)  # backbone lr = lr x this when fine-tuning

    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on CUDA GPUs that support it
    channels_last: Literal["auto", "on", "off"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, le=512)

    val_fraction: float = Field(0.15, ge=0, lt=0.9)
    test_fraction: float = Field(0.15, ge=0, lt=0.9)
    splits_file: str | None = None
    on_bad_image: Literal["fail", "skip"] = "fail"
    on_bad_label: Literal["fail", "skip"] = "fail"  # detection labels: degenerate boxes, unknown classes, ...
    seed: int = Field(0, ge=0)
    health_every: int = Field(10, ge=1)  # per-layer gradient norms every N steps
    tensorboard: bool = False
    max_train_batches: int | None = Field(None, ge=1)  # cap per epoch, for smoke tests
    # wall-clock limit of the training loop (seconds): stop before an epoch that would not finish
    # in time, keeping the best checkpoint; None = no limit (the epoch count alone decides)
    time_limit_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        if self.adv_train != "none" and self.adv_eps == 0:
            raise ValueError(f"adv_train={self.adv_train!r} needs adv_eps > 0 (e.g. 0.031 = 8/255)")
        return self


def _format_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown option"
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) and first["type"] != "missing" else ""
    return f"{where}: {field}: {msg}{shown}"


def make_config(values: dict[str, Any], *, where: str = "options") -> TrainConfig:
    return make_config_of(TrainConfig, values, where=where)


def make_config_of(model: type[M], values: dict[str, Any], *, where: str = "options") -> M:
    """Build any of our pydantic configs, turning validation errors into one-line ConfigErrors."""
    try:
        return model(**values)
    except ValidationError as e:
        raise ConfigError(_format_error(e, where)) from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of options")
    return loaded


def resolve_config(file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """defaults <- file <- overrides (None overrides are ignored)."""
    values: dict[str, Any] = {}
    if file is not None:
        values.update(load_config_file(file))
        make_config(values, where=str(file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return make_config(values)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
