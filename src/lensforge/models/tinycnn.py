"""TinyCNN: our own small, fast CNN family for tiny images (64 px and below).

timm's smallest ImageNet models are built for 224 px inputs and waste most of
their compute on 8-64 px images on a CPU; this family is a few residual conv
stages in the spirit of airbench (conv-BN-ReLU, max-pool, residual conv), sized
to train in seconds on two cores. It implements timm's model interface
(``forward_features``, ``forward_head``, ``get_classifier``, ``reset_classifier``,
``num_features``, ``pretrained_cfg``) so every tool treats it like a timm model.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Stage(nn.Module):
    """Widen, halve the resolution, then one residual conv block."""

    def __init__(self, c_in: int, c_out: int, depth: int = 1) -> None:
        super().__init__()
        self.conv = ConvBN(c_in, c_out)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.blocks = nn.ModuleList(nn.Sequential(ConvBN(c_out, c_out), ConvBN(c_out, c_out))
                                    for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv(x))
        for block in self.blocks:
            x = x + block(x)
        return x


class StridedStem(nn.Sequential):
    """A ``k``x``k`` stride-2 convolution: the network starts at half resolution."""

    def __init__(self, c_in: int, c_out: int, k: int = 3) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, k, stride=2, padding=(k - 1) // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TinyCNN(nn.Module):
    """Stem plus three downsampling stages, global average pooling, linear head.

    ``stem="patch"`` (2x2) or ``"s2"`` (3x3) starts at half resolution with a stride-2 stem:
    2.5-3.5x cheaper per training image on a CPU, but measured less accurate at equal epochs
    (``benchmarks/cpu_recipe.py``, BENCHMARKS.md), so no registered model uses it; it stays
    for that benchmark and for users who trade accuracy for speed (``TinyCNN(stem="s2")``).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: tuple[int, int, int] = (32, 64, 128),
                 depth: int = 1, drop_rate: float = 0.0, stem: str = "conv", stem_width: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]
        stem_width = stem_width or widths[0] // 2
        if stem == "conv":
            self.stem = ConvBN(in_chans, stem_width)
        else:  # "patch": 2x2, "s2": 3x3, both stride 2
            self.stem = StridedStem(in_chans, stem_width, 2 if stem == "patch" else 3)
        chans = [stem_width, *widths]
        self.stages = nn.Sequential(*(Stage(chans[i], chans[i + 1], depth) for i in range(len(widths))))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {"mean": (0.5,) * in_chans, "std": (0.5,) * in_chans,
                               "input_size": (in_chans, 32, 32), "interpolation": "bilinear",
                               "classifier": "fc"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        if pre_logits:
            return x
        return self.fc(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
