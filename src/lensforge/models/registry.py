"""The model registry: our own models by name, plus every timm classifier.

``create_model(name, num_classes=..., pretrained=..., in_chans=...)`` builds one;
``list_models(pattern)`` lists names. Pretrained weights come from local files
(see :mod:`lensforge.models.pretrained`); ``pretrained="hub"`` lets timm
download for users who are online.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from lensforge.data.preprocess import Preprocess
from lensforge.errors import UsageError
from lensforge.models.tinycnn import TinyCNN
from lensforge.registry import Registry

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")

# Curated timm families we test and recommend; any other timm name also works.
RECOMMENDED_TIMM = ("resnet18", "resnet10t", "resnet50", "mobilenetv3_small_100",
                    "mobilenetv3_large_100", "tf_efficientnet_lite0", "efficientnet_lite0",
                    "convnext_atto", "convnext_tiny")


def _tiny(widths: tuple[int, int, int], depth: int) -> ModelFactory:
    def build(num_classes: int, in_chans: int, **kw: Any) -> nn.Module:
        return TinyCNN(num_classes=num_classes, in_chans=in_chans, widths=widths, depth=depth, **kw)
    return build


MODELS.register("tinycnn_xs")(_tiny((16, 32, 64), 1))
MODELS.register("tinycnn_s")(_tiny((32, 64, 128), 1))
MODELS.register("tinycnn_m")(_tiny((48, 96, 192), 2))


def _is_timm(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def list_models(pattern: str = "*", *, include_timm: bool = True) -> list[str]:
    names = MODELS.list(pattern)
    if include_timm:
        import timm

        names += sorted(set(timm.list_models(pattern)) - set(names))
    return names


def create_model(name: str, *, num_classes: int, pretrained: str | None = None, in_chans: int = 3,
                 **kwargs: Any) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes and ``in_chans`` input channels."""
    if num_classes < 1:
        raise UsageError(f"num_classes must be at least 1, not {num_classes}")
    if in_chans not in (1, 3):
        raise UsageError(f"in_chans must be 1 or 3, not {in_chans}")
    if name in MODELS:
        if pretrained not in (None, "none"):
            raise UsageError(f"model '{name}' has no pretrained weights; drop --pretrained")
        return MODELS.get(name)(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if not _is_timm(name):
        import timm

        close = difflib.get_close_matches(name, MODELS.list() + timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown model {name!r}{hint} (see `lensforge list models`)")
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained == "hub", num_classes=num_classes,
                                  in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise UsageError(f"model '{name}' does not accept these options: {e}") from None
    if pretrained not in (None, "none", "hub"):
        from lensforge.models.pretrained import apply_pretrained, resolve_pretrained

        state = resolve_pretrained(pretrained, name)
        if state is not None:
            apply_pretrained(model, state, source=str(pretrained))
    return model


def default_preprocess(model: nn.Module, *, image_size: int | None, channels: int,
                       pretrained: str | None = None) -> Preprocess:
    """Preprocessing from the model's own config, resized to ``image_size`` if given."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    mean = tuple(cfg.get("mean", (0.5,) * 3))
    std = tuple(cfg.get("std", (0.5,) * 3))
    if pretrained in (None, "none") and not isinstance(model, TinyCNN):
        mean, std = (0.5,) * 3, (0.5,) * 3  # no pretrained statistics to match: centre the pixels
    if channels == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    else:
        mean, std = mean[:3] if len(mean) >= 3 else mean * 3, std[:3] if len(std) >= 3 else std * 3
    size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in ("nearest", "bilinear", "bicubic", "lanczos", "box"):
        interpolation = "bilinear"
    crop_pct = 1.0
    if pretrained not in (None, "none"):
        from lensforge.models.pretrained import EFFICIENTNET_LITE0_MODELS, EFFICIENTNET_LITE0_PREPROCESS

        if cfg.get("architecture") in EFFICIENTNET_LITE0_MODELS:  # the offline weights expect 0.5/0.5
            mean = EFFICIENTNET_LITE0_PREPROCESS["mean"][:channels] if channels == 3 else (0.5,)
            std = EFFICIENTNET_LITE0_PREPROCESS["std"][:channels] if channels == 3 else (0.5,)
        crop_pct = float(cfg.get("crop_pct", 1.0)) if size == int(cfg.get("input_size", (3, 0, 0))[-1]) else 1.0
    return Preprocess(input_size=(size, size), channels=channels, mean=mean, std=std,
                      interpolation=interpolation, crop_pct=crop_pct)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


