"""Compact anchor-free detectors (FCOS-style) sized for CPUs: backbone -> light FPN -> shared head.

A detector is a backbone giving stride-8/16/32 feature maps, a top-down FPN of
depthwise-separable convolutions at ``neck_channels``, and one head whose convolutions all
levels share (each level keeps its own batch norms, as EfficientDet's heads do: shared
statistics would mix the levels' different feature scales and differ between training and
evaluation). The forward pass returns the raw outputs of the detection contract
(:data:`lensforge.tasks.detection.RAW_OUTPUTS`): class logits, box distances in input
pixels, centre-ness logits, and pooled backbone features for the OOD guardrails.

Registered detectors (``create_detector(name, num_classes=..., in_chans=..., pretrained=...)``):

* ``fcos_tiny``: our own stride-2 conv stack built from TinyCNN's blocks, from scratch,
  for small or synthetic images;
* ``fcos_lite0``: timm's ``tf_efficientnet_lite0`` (``features_only``), with the offline
  ImageNet weights (``pretrained="package"``), for photos.

Measured on 2 shared cores of an Intel Xeon (torch 2.14, channels-last, 256-px input, 6 classes):

=============  ========  ================  ===============================
detector       params    train (img/s)     eval forward (ms/img, batch 1/16)
=============  ========  ================  ===============================
fcos_tiny      0.78 M    70                15 / 3.4
fcos_lite0     3.08 M    12                43 / 15.5
=============  ========  ================  ===============================

Exported to ONNX (legacy exporter, fp32) and run by ONNX Runtime on 2 threads: 1.8 / 1.5 ms per
image for ``fcos_tiny``, 7.3 / 8.7 ms for ``fcos_lite0`` (batch 1 / 16).

On ``builtin:shapes?task=detect&n=3000&size=256`` with a 10-minute limit, ``fcos_tiny`` from
scratch reached val mAP@0.5 0.957 (test 0.972, mAP@[.5:.95] 0.859) in 13 epochs, and
``fcos_lite0`` from ImageNet weights 0.929 in the 2 epochs that fit.

References: Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019
(and the "FCOS: A Simple and Strong Anchor-free Object Detector" TPAMI version for the
centre sampling, GIoU and centre-ness on the regression branch); Tan et al., "EfficientDet",
CVPR 2020 (shared separable head convolutions with per-level batch norms).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lensforge.errors import UsageError
from lensforge.models.tinycnn import ConvBN, StridedStem
from lensforge.registry import Registry
from lensforge.tasks.detection import DetectionHead

STRIDES = (8, 16, 32)
PRIOR_PROB = 0.01  # initial foreground probability of every class logit (focal loss paper, Sec. 4.1)
MAX_LOG_DISTANCE = 12.0  # exp() argument cap: distances up to e^12 strides, only a guard against overflow


def _sep_conv(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 depthwise + 1x1 pointwise conv, batch norm, ReLU (the neck's building block)."""
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _conv1x1(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TinyBackbone(nn.Module):
    """Stride-2 3x3 convs (TinyCNN's ``StridedStem``) down to 1/4, then three stages at 1/8, 1/16, 1/32.

    Each stage halves the resolution with a strided conv and adds ``depth`` residual
    conv-conv blocks (TinyCNN's ``ConvBN``). Dense 3x3 convolutions rather than depthwise
    ones: from scratch they learn more per epoch, and oneDNN runs them near peak on a CPU.
    """

    def __init__(self, in_chans: int = 3, stem_widths: tuple[int, int] = (16, 32),
                 widths: tuple[int, int, int] = (64, 96, 128), depth: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(StridedStem(in_chans, stem_widths[0]), StridedStem(*stem_widths))
        chans = [stem_widths[1], *widths]
        self.stages = nn.ModuleList(
            nn.ModuleDict({"down": StridedStem(chans[i], chans[i + 1]),
                           "blocks": nn.ModuleList(nn.Sequential(ConvBN(chans[i + 1], chans[i + 1]),
                                                                 ConvBN(chans[i + 1], chans[i + 1]))
                                                   for _ in range(depth))})
            for i in range(len(widths)))
        self.out_channels = tuple(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage["down"](x)
            for block in stage["blocks"]:
                x = x + block(x)
            outs.append(x)
        return outs


class TimmBackbone(nn.Module):
    """A timm model's stride-8/16/32 feature maps (``features_only``)."""

    def __init__(self, name: str, in_chans: int = 3) -> None:
        super().__init__()
        import timm

        probe = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_chans)
        reductions = probe.feature_info.reduction()
        try:
            out_indices = tuple(reductions.index(s) for s in STRIDES)
        except ValueError:
            raise UsageError(f"backbone '{name}' has no features at strides {STRIDES} "
                             f"(it has {reductions})") from None
        self.body = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_chans,
                                      out_indices=out_indices)
        self.out_channels = tuple(self.body.feature_info.channels())
        self.pretrained_cfg = dict(getattr(self.body, "pretrained_cfg", None) or {})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


class LightFPN(nn.Module):
    """Top-down FPN: 1x1 laterals to ``channels``, nearest upsampling and add, a separable 3x3 per level."""

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(_conv1x1(c, channels) for c in in_channels)
        self.smooth = nn.ModuleList(_sep_conv(channels, channels) for _ in in_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [lateral(f) for lateral, f in zip(self.laterals, feats)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):  # size= rather than scale_factor: odd input sides round up
            merged.insert(0, lateral + F.interpolate(merged[0], size=lateral.shape[-2:], mode="nearest"))
        return [smooth(m) for smooth, m in zip(self.smooth, merged)]


class SharedSepConv(nn.Module):
    """A separable 3x3 conv whose weights every level shares, with one batch norm per level."""

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(levels))

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        return F.relu(self.norms[level](self.pointwise(self.depthwise(x))), inplace=True)


class FCOSHead(nn.Module):
    """Classification tower and box tower (box distances and centre-ness), shared over levels."""

    def __init__(self, channels: int, num_classes: int, strides: Sequence[int], convs: int = 2) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.cls_tower = nn.ModuleList(SharedSepConv(channels, len(strides)) for _ in range(convs))
        self.box_tower = nn.ModuleList(SharedSepConv(channels, len(strides)) for _ in range(convs))
        self.cls_pred = nn.Conv2d(channels, num_classes, 1)
        self.box_pred = nn.Conv2d(channels, 4, 1)
        self.ctr_pred = nn.Conv2d(channels, 1, 1)
        self.scales = nn.Parameter(torch.ones(len(strides)))  # learnable per-level scale of the box logits
        for conv in (self.cls_pred, self.box_pred, self.ctr_pred):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cls_out, box_out, ctr_out = [], [], []
        for level, (x, stride) in enumerate(zip(feats, self.strides)):
            c, b = x, x
            for conv in self.cls_tower:
                c = conv(c, level)
            for conv in self.box_tower:
                b = conv(b, level)
            # distances in input pixels: exp keeps them positive with a gradient everywhere; x stride
            # makes one logit unit mean the same relative size on every level (FCOS's norm_reg_targets)
            distances = torch.exp((self.box_pred(b) * self.scales[level]).clamp(max=MAX_LOG_DISTANCE)) * stride
            cls_out.append(_flatten(self.cls_pred(c)))
            box_out.append(_flatten(distances))
            ctr_out.append(_flatten(self.ctr_pred(b)))
        return torch.cat(cls_out, 1), torch.cat(box_out, 1), torch.cat(ctr_out, 1)[..., 0]


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, H*W, K), row-major over the level's points (the raw-output contract)."""
    return x.flatten(2).transpose(1, 2)


class FCOSDetector(nn.Module):
    """Backbone, FPN and FCOS head; ``forward`` returns ``(cls_logits, box_ltrb, centerness, features)``.

    Attributes:
        num_classes: number of object classes.
        num_features: width of the pooled ``features`` output.
        pretrained_cfg: mean, std and default input size, as timm models carry them.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, neck_channels: int = 64, head_convs: int = 2,
                 pretrained_cfg: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.neck = LightFPN(backbone.out_channels, neck_channels)
        self.head = FCOSHead(neck_channels, num_classes, STRIDES, head_convs)
        self.num_features = backbone.out_channels[-1]
        self.pretrained_cfg = dict(pretrained_cfg or {})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        cls_logits, box_ltrb, centerness = self.head(self.neck(feats))
        features = feats[-1].mean((2, 3))
        return cls_logits, box_ltrb, centerness, features

    def head_geometry(self, input_size: tuple[int, int] | int, **options: Any) -> DetectionHead:
        """The :class:`DetectionHead` for inputs of ``input_size`` (height, width); options go to it.

        Every backbone here rounds up at each stride-2 step (``same``-style padding), so a
        level of stride s is ceil(H / s) x ceil(W / s) (tests check it against the forward pass).
        """
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        levels = tuple((s, -(-height // s), -(-width // s)) for s in STRIDES)
        return DetectionHead(levels=levels, **options)

    def backbone_parameter_names(self) -> set[str]:
        """Names of the backbone's parameters (a pretrained backbone trains at a lower learning rate)."""
        return {f"backbone.{name}" for name, _ in self.backbone.named_parameters()}


DetectorFactory = Callable[..., FCOSDetector]
DETECTORS: Registry[DetectorFactory] = Registry("detector", listed=False)  # errors name the known ones
CENTRED = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # no pretrained statistics: centre the pixels


def _check_no_pretrained(name: str, pretrained: str | None) -> None:
    if pretrained not in (None, "none"):
        raise UsageError(f"detector '{name}' has no pretrained weights; drop --pretrained")


@DETECTORS.register("fcos_tiny")
def fcos_tiny(*, num_classes: int, in_chans: int = 3, pretrained: str | None = None) -> FCOSDetector:
    """~0.5 M parameters; for small and synthetic images, trained from scratch."""
    _check_no_pretrained("fcos_tiny", pretrained)
    return FCOSDetector(TinyBackbone(in_chans), num_classes, neck_channels=64, head_convs=2,
                        pretrained_cfg={**CENTRED, "input_size": (in_chans, 256, 256)})


@DETECTORS.register("fcos_lite0")
def fcos_lite0(*, num_classes: int, in_chans: int = 3, pretrained: str | None = None) -> FCOSDetector:
    """EfficientNet-Lite0 features (ImageNet weights with ``pretrained="package"``); for photos."""
    backbone = TimmBackbone("tf_efficientnet_lite0", in_chans)
    if pretrained not in (None, "none"):
        _load_backbone_weights(backbone, pretrained, "tf_efficientnet_lite0")
    cfg = {**CENTRED, "input_size": (in_chans, 320, 320)} if pretrained in (None, "none") else {
        "mean": backbone.pretrained_cfg.get("mean", CENTRED["mean"]),
        "std": backbone.pretrained_cfg.get("std", CENTRED["std"]), "input_size": (in_chans, 320, 320)}
    return FCOSDetector(backbone, num_classes, neck_channels=96, head_convs=2, pretrained_cfg=cfg)


def _load_backbone_weights(backbone: TimmBackbone, pretrained: str, architecture: str) -> None:
    """Classification weights into a ``features_only`` backbone: its keys are theirs minus the head."""
    from lensforge.models.pretrained import apply_pretrained, resolve_pretrained

    state = resolve_pretrained(pretrained, architecture)
    if state is None:
        return
    wanted = backbone.body.state_dict()
    apply_pretrained(backbone.body, {k: v for k, v in state.items() if k in wanted}, source=str(pretrained),
                     skip_classifier_mismatch=False)


def create_detector(name: str, *, num_classes: int, in_chans: int = 3, pretrained: str | None = None) -> FCOSDetector:
    """Build registered detector ``name`` for ``num_classes`` classes and ``in_chans`` input channels."""
    if num_classes < 1:
        raise UsageError(f"num_classes must be at least 1, not {num_classes}")
    if in_chans not in (1, 3):
        raise UsageError(f"in_chans must be 1 or 3, not {in_chans}")
    return DETECTORS.get(name)(num_classes=num_classes, in_chans=in_chans, pretrained=pretrained)


def list_detectors(pattern: str = "*") -> list[str]:
    return DETECTORS.list(pattern)


__all__ = ["DETECTORS", "FCOSDetector", "create_detector", "list_detectors"]
