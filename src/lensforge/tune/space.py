"""The search space: which :class:`~lensforge.train.config.TrainConfig` options a study varies.

Each parameter is named after the TrainConfig field it sets, so a trial's parameters are
training options as they are (``best.yaml`` is a plain training config). The default space
is built from the data: the TinyCNN sizes for images of 64 px and below when the model is
``auto``, otherwise the given model alone; input sizes around the one ``lensforge train``
would pick. Pass your own ``space`` to :func:`lensforge.tune.tune` to search something else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lensforge.errors import UsageError

TINY_MODELS = ("tinycnn_xs", "tinycnn_s", "tinycnn_m")
IMAGE_SIZE_SCALES = (0.5, 0.75, 1.0)  # of the size `lensforge train` picks; smaller is faster, rarely better
LR_RANGE = (3e-4, 1e-2)  # AdamW peak lr (default 2e-3 at batch 128), searched on a log scale
WEIGHT_DECAY_RANGE = (1e-4, 0.2)  # default 0.05, log scale
LABEL_SMOOTHING_RANGE = (0.0, 0.2)  # default 0.1
BATCH_SIZES = (32, 64, 128, 256)
AUGMENT_LEVELS = ("none", "light", "strong")
MIXUP_ALPHAS = (0.0, 0.2)  # 0 = off; 0.2 is the usual small-data value (Zhang et al. 2018)
CUTMIX_ALPHAS = (0.0, 1.0)  # 0 = off; 1.0 as in Yun et al. 2019


@dataclass(frozen=True)
class FloatParam:
    """A float option drawn from [low, high], on a log scale when ``log``."""

    name: str
    low: float
    high: float
    log: bool = False

    def suggest(self, trial: Any) -> float:
        return float(trial.suggest_float(self.name, self.low, self.high, log=self.log))

    def holds(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass(frozen=True)
class ChoiceParam:
    """An option taking one of ``choices`` (None, bool, int, float or str: what Optuna stores)."""

    name: str
    choices: tuple[Any, ...]

    def suggest(self, trial: Any) -> Any:
        return trial.suggest_categorical(self.name, list(self.choices))

    def holds(self, value: Any) -> bool:
        return value in self.choices


Param = FloatParam | ChoiceParam
SearchSpace = tuple[Param, ...]


def default_space(model: str, native_size: int | None, auto_image_size: int) -> SearchSpace:
    """lr, weight decay, batch size, label smoothing, augmentation, mixup, CutMix, model size, image size."""
    from lensforge.train.setup import TINY_IMAGE_MAX

    models = TINY_MODELS if model == "auto" and native_size is not None and native_size <= TINY_IMAGE_MAX else ()
    space: list[Param] = [
        FloatParam("lr", *LR_RANGE, log=True),
        FloatParam("weight_decay", *WEIGHT_DECAY_RANGE, log=True),
        ChoiceParam("batch_size", BATCH_SIZES),
        FloatParam("label_smoothing", *LABEL_SMOOTHING_RANGE),
        ChoiceParam("augment", AUGMENT_LEVELS),
        ChoiceParam("mixup", MIXUP_ALPHAS),
        ChoiceParam("cutmix", CUTMIX_ALPHAS),
    ]
    if models:
        space.append(ChoiceParam("model", models))
    sizes = image_sizes(auto_image_size)
    if len(sizes) > 1:
        space.append(ChoiceParam("image_size", sizes))
    return tuple(space)


def image_sizes(base: int) -> tuple[int, ...]:
    """Input sides to try: ``base`` itself and smaller fractions of it (multiples of 8, at least 8 px)."""
    smaller = {max(8, round(base * scale / 8) * 8) for scale in IMAGE_SIZE_SCALES if scale < 1}
    return tuple(sorted({base} | {side for side in smaller if side < base}))


def check_space(space: Sequence[Param]) -> SearchSpace:
    """Every parameter names a TrainConfig option, once."""
    from lensforge.train.config import TrainConfig
    from lensforge.tune.config import STUDY_OWNED

    names = [p.name for p in space]
    for name in names:
        if name not in TrainConfig.model_fields:
            raise UsageError(f"search space: {name!r} is not a training option")
        if name in STUDY_OWNED:
            raise UsageError(f"search space: {name!r} is set by the study, not searched")
    if len(set(names)) != len(names):
        raise UsageError(f"search space names a parameter twice: {', '.join(names)}")
    return tuple(space)


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Draw one configuration: TrainConfig options by name."""
    return {param.name: param.suggest(trial) for param in space}
