"""Over- and underfitting from per-epoch curves, with concrete advice.

:func:`diagnose_fit` reads the rows a training run logs per epoch
(``epoch, train_loss, train_acc, val_loss, val_acc``; accuracies in [0, 1], any of
them may be missing) and returns what the curves show. The thresholds below are
heuristics sized for small vision data sets (hundreds to thousands of validation
images), where one epoch-to-epoch wiggle of 1-3 points is noise.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lensforge.errors import ConfigError

__all__ = ["FitDiagnosis", "diagnose_fit"]

# Train accuracy this far above val accuracy at the end is memorisation. Train acc is
# measured on augmented batches (dropout on), which lowers it, so what remains above
# 8 points is well beyond the ~2-3 point noise of a small validation set.
OVERFIT_ACC_GAP = 0.08
# Val loss must stay above its minimum this many epochs, and by this much (relative),
# before it counts as rising: one or two noisy epochs are not a trend.
VAL_LOSS_RISE_EPOCHS = 3
VAL_LOSS_RISE_REL = 0.05
# Train accuracy within 10% of the way from chance to perfect has learned ~nothing
# (10 classes: below 19%; 2 classes: below 55%).
CHANCE_MARGIN = 0.10
# Without train accuracy: a train loss still at 90% of the chance loss ln(C).
CHANCE_LOSS_SHARE = 0.9
# Train accuracy below this that has stopped rising: the model cannot fit the data.
UNDERFIT_TRAIN_ACC = 0.80
# "Stopped rising": best of the last 3 epochs beats the earlier best by < 1 point.
PLATEAU_EPOCHS = 3
PLATEAU_GAIN = 0.01
# "Still improving": the last epoch is the best (ties count: accuracy on a small val
# set moves in steps) and the last 2 epochs gained more than 1 accuracy point (or cut
# the val loss by 2%). Two epochs, not three: a curve that rose and then sat flat
# for two epochs has finished.
IMPROVING_EPOCHS = 2
IMPROVING_ACC_GAIN = 0.01
IMPROVING_LOSS_DROP_REL = 0.02
# Unstable: epoch-to-epoch val loss swings above 25% of its median (or 10 accuracy
# points) that reverse direction at least twice (up-down-up): a trend never does.
UNSTABLE_LOSS_SWING_REL = 0.25
UNSTABLE_ACC_SWING = 0.10
UNSTABLE_MIN_REVERSALS = 2
# Trends need this many epochs; shorter runs only get the checks that need none.
MIN_TREND_EPOCHS = 3

Series = list[tuple[int, float]]  # (epoch, value), finite values only


@dataclass(frozen=True)
class FitDiagnosis:
    """One finding about the fit, with what to try next.

    Attributes:
        kind: ``overfitting``, ``underfitting``, ``still_improving``, ``unstable`` or
            ``healthy``.
        message: what the curves show, with the numbers.
        suggestions: concrete next steps, most promising first.
    """

    kind: str
    message: str
    suggestions: tuple[str, ...] = ()


def diagnose_fit(history: Sequence[Mapping[str, Any]], *, num_classes: int) -> list[FitDiagnosis]:
    """Diagnose over/underfitting, instability or unfinished training from epoch rows.

    Args:
        history: one row per epoch, in order; keys ``epoch``, ``train_loss``,
            ``train_acc``, ``val_loss``, ``val_acc`` (missing or ``None`` allowed).
        num_classes: number of classes, for the chance level.

    Returns:
        Findings, most urgent first (unstable, underfitting, overfitting, still
        improving), or a single ``healthy`` finding; empty for an empty history.
    """
    if num_classes < 2:
        raise ConfigError(f"diagnose_fit: num_classes must be >= 2, got {num_classes!r}")
    if not history:
        return []
    curves = {key: _series(history, key)
              for key in ("train_loss", "train_acc", "val_loss", "val_acc")}
    epochs = len(history)
    unstable = _unstable(history, curves)
    findings = [unstable] if unstable else []
    underfit = _underfitting(curves, epochs, num_classes)
    if underfit:
        # Until the training set is fitted, gaps and rising val loss say little, and
        # "train longer" is already part of the advice.
        return [*findings, underfit]
    # An oscillating val loss has no meaningful minimum to be rising from.
    overfit = _overfitting(curves, use_val_loss=unstable is None)
    findings += [f for f in (overfit, _still_improving(curves, epochs)) if f]
    return findings or [_healthy(curves, epochs)]


def _series(history: Sequence[Mapping[str, Any]], key: str) -> Series:
    """Finite values of one column with their epochs (row index if no epoch)."""
    values = []
    for index, row in enumerate(history):
        value = row.get(key)
        if value is not None and math.isfinite(float(value)):
            epoch = row.get("epoch")
            values.append((index if epoch is None else int(epoch), float(value)))
    return values


def _nonfinite_epoch(history: Sequence[Mapping[str, Any]], key: str) -> int | None:
    for index, row in enumerate(history):
        value = row.get(key)
        if value is not None and not math.isfinite(float(value)):
            return index if row.get("epoch") is None else int(row["epoch"])
    return None


def _unstable(
    history: Sequence[Mapping[str, Any]], curves: dict[str, Series]
) -> FitDiagnosis | None:
    advice = (
        "lower the learning rate (e.g. halve --lr) or lengthen the warm-up (warmup_epochs)",
        "keep gradient clipping on and check the gradient-health section for explosions",
        "use a larger batch or a larger validation set if the val set is tiny",
    )
    for key in ("train_loss", "val_loss"):
        epoch = _nonfinite_epoch(history, key)
        if epoch is not None:
            return FitDiagnosis("unstable", f"{key} became non-finite at epoch {epoch}: "
                                "training diverged", advice)
    val_loss, val_acc = curves["val_loss"], curves["val_acc"]
    if len(val_loss) > MIN_TREND_EPOCHS:
        swing = UNSTABLE_LOSS_SWING_REL * statistics.median(v for _, v in val_loss)
        series, name = val_loss, "val loss"
    elif len(val_acc) > MIN_TREND_EPOCHS:
        swing, series, name = UNSTABLE_ACC_SWING, val_acc, "val acc"
    else:
        return None
    reversals, largest = _big_swing_reversals([v for _, v in series], swing)
    if reversals < UNSTABLE_MIN_REVERSALS:
        return None
    return FitDiagnosis(
        "unstable",
        f"{name} oscillates: {reversals} reversals of swings above {swing:.3g} "
        f"(largest {largest:.3g}) over {len(series)} epochs",
        advice,
    )


def _big_swing_reversals(values: list[float], swing: float) -> tuple[int, float]:
    """How often epoch-to-epoch changes larger than ``swing`` flip sign, and the largest."""
    big = [b - a for a, b in itertools.pairwise(values) if abs(b - a) > swing]
    reversals = sum(1 for d0, d1 in itertools.pairwise(big) if (d0 > 0) != (d1 > 0))
    return reversals, max((abs(d) for d in big), default=0.0)


def _underfitting(curves: dict[str, Series], epochs: int, num_classes: int) -> FitDiagnosis | None:
    chance = 1.0 / num_classes
    train_acc = [v for _, v in curves["train_acc"]]
    val_acc = [v for _, v in curves["val_acc"]]
    # one epoch says little about trends, but a model at chance on both splits is not "healthy"
    val_at_chance = bool(val_acc) and (val_acc[-1] - chance) / (1 - chance) < CHANCE_MARGIN
    if train_acc and (epochs >= 2 or val_at_chance):
        last = train_acc[-1]
        if (last - chance) / (1 - chance) < CHANCE_MARGIN:
            message = (f"train acc {last:.1%} after {epochs} epoch(s) is barely above chance "
                       f"({chance:.1%} for {num_classes} classes): the model is not learning")
            return FitDiagnosis("underfitting", message, _underfit_advice(epochs, chance=True))
        if last < UNDERFIT_TRAIN_ACC and _plateaued(train_acc):
            message = (f"train acc plateaued at {last:.1%} (below {UNDERFIT_TRAIN_ACC:.0%}) over "
                       f"the last {PLATEAU_EPOCHS} epochs: the model cannot fit the training set")
            return FitDiagnosis("underfitting", message, _underfit_advice(epochs, chance=False))
    train_loss = [v for _, v in curves["train_loss"]]
    if not train_acc and train_loss and epochs >= 2:
        chance_loss = math.log(num_classes)
        if train_loss[-1] >= CHANCE_LOSS_SHARE * chance_loss:
            message = (f"train loss {train_loss[-1]:.3g} after {epochs} epochs is still near "
                       f"the chance loss ln({num_classes}) = {chance_loss:.3g}: "
                       "the model is not learning")
            return FitDiagnosis("underfitting", message, _underfit_advice(epochs, chance=True))
    return None


def _plateaued(values: list[float]) -> bool:
    if len(values) <= PLATEAU_EPOCHS:
        return False
    return max(values[-PLATEAU_EPOCHS:]) - max(values[:-PLATEAU_EPOCHS]) < PLATEAU_GAIN


def _underfit_advice(epochs: int, *, chance: bool) -> tuple[str, ...]:
    check_data = (
        "check labels and preprocessing first (shuffled labels or a wrong mean/std keep a "
        "model at chance)"
    )
    return (
        *((check_data,) if chance else ()),
        "use a bigger model (e.g. --model resnet50 instead of resnet18) or --pretrained weights",
        f"train longer: --epochs {_more_epochs(epochs)}",
        "raise the learning rate (--lr x2-3) if the loss falls slowly",
        (
            "weaken regularisation: lower --weight-decay and label smoothing, drop --mixup/"
            "--cutmix, use --augment light"
        ),
    )


def _overfitting(curves: dict[str, Series], *, use_val_loss: bool) -> FitDiagnosis | None:
    observations = []
    train_acc, val_acc = dict(curves["train_acc"]), dict(curves["val_acc"])
    common = [e for e in train_acc if e in val_acc]
    if common:
        last = common[-1]
        gap = train_acc[last] - val_acc[last]
        if gap > OVERFIT_ACC_GAP:
            observations.append(f"train acc {train_acc[last]:.1%} vs val acc {val_acc[last]:.1%} "
                                f"(gap {gap * 100:.0f} points) at epoch {last}")
    rising = _val_loss_rising(curves["val_loss"], curves["train_loss"]) if use_val_loss else None
    if rising:
        observations.append(rising)
    if not observations:
        return None
    best = min(curves["val_loss"], key=lambda p: p[1])[0] if curves["val_loss"] else None
    keep_best = (
        (f"keep the epoch-{best} checkpoint (best val loss) or stop early",) if rising else ()
    )
    suggestions = (
        "more augmentation: --mixup 0.2 (or --cutmix 1.0) and --augment strong",
        "more regularisation: raise --weight-decay (e.g. 0.1) and label smoothing (e.g. 0.2)",
        *keep_best,
        "more or more varied training data, or a smaller or --pretrained model",
    )
    return FitDiagnosis("overfitting", "; ".join(observations), suggestions)


def _val_loss_rising(val_loss: Series, train_loss: Series) -> str | None:
    if len(val_loss) <= VAL_LOSS_RISE_EPOCHS:
        return None
    best_index = min(range(len(val_loss)), key=lambda i: val_loss[i][1])
    best_epoch, best = val_loss[best_index]
    last_epoch, last = val_loss[-1]
    epochs_since_best = len(val_loss) - 1 - best_index
    if epochs_since_best < VAL_LOSS_RISE_EPOCHS or last <= best * (1 + VAL_LOSS_RISE_REL):
        return None
    rising = f"val loss rising since epoch {best_epoch} ({best:.3g} -> {last:.3g})"
    train = dict(train_loss)
    if best_epoch not in train or last_epoch not in train:
        return rising
    if train[last_epoch] >= train[best_epoch]:
        return None  # both rising is instability or a bad lr, not overfitting
    return f"{rising} while train loss falls"


def _still_improving(curves: dict[str, Series], epochs: int) -> FitDiagnosis | None:
    if epochs < 2:
        return None
    val_acc, val_loss = curves["val_acc"], curves["val_loss"]
    window = min(IMPROVING_EPOCHS, epochs - 1)
    # Val accuracy first: it is what picks the best epoch; the loss when it is missing.
    if len(val_acc) > window:
        values = [v for _, v in val_acc]
        gain = values[-1] - values[-1 - window]
        if values[-1] < max(values) or gain <= IMPROVING_ACC_GAIN:
            return None
        shown = f"val acc still rising: +{gain * 100:.1f} points over the last {window} epochs"
    elif len(val_loss) > window:
        values = [v for _, v in val_loss]
        drop = (values[-1 - window] - values[-1]) / values[-1 - window]
        if values[-1] > min(values) or drop <= IMPROVING_LOSS_DROP_REL:
            return None
        shown = f"val loss still falling: -{drop:.0%} over the last {window} epochs"
    else:
        return None
    message = f"{shown}, best at the last epoch ({epochs} epochs run)"
    longer = (f"train longer: --epochs {_more_epochs(epochs)} (early stopping ends the run "
              "sooner if val stops improving)")
    return FitDiagnosis("still_improving", message, (longer,))


def _healthy(curves: dict[str, Series], epochs: int) -> FitDiagnosis:
    parts = []
    if curves["train_acc"] and curves["val_acc"]:
        train, val = curves["train_acc"][-1][1], curves["val_acc"][-1][1]
        gap = (train - val) * 100
        parts.append(f"train acc {train:.1%}, val acc {val:.1%} (gap {gap:.1f} points)")
    if curves["val_loss"]:
        best_epoch = min(curves["val_loss"], key=lambda p: p[1])[0]
        parts.append(f"best val loss at epoch {best_epoch}")
    if epochs < MIN_TREND_EPOCHS:
        parts.append(f"only {epochs} epoch(s): too short to judge trends")
    else:
        parts.append("no sign of over- or underfitting")
    return FitDiagnosis("healthy", "; ".join(parts))


def _more_epochs(epochs: int) -> int:
    """A longer run worth trying: 1.5x, and at least 5 more epochs."""
    return max(epochs + 5, math.ceil(epochs * 1.5))
