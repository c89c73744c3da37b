"""What a tuning study is asked to do: one frozen, validated :class:`TuneConfig`.

Torch- and Optuna-free, so the CLI can check every option before anything heavy loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lensforge.errors import UsageError
from lensforge.planning import parse_duration as _parse_duration

if TYPE_CHECKING:
    from lensforge.train.config import TrainConfig  # imports torch (lensforge.train): only when needed

# Per-trial training length: long enough for the ranking of configurations at the end to
# say something about a full run, short enough that 20 trials fit a coffee break on a CPU.
DEFAULT_TRIAL_EPOCHS = 10
DEFAULT_TRIALS = 20
# MedianPruner: completed trials before any pruning (their curves are what "median" means),
# and the first epoch at which a trial may be pruned (epoch 1 is mostly warm-up noise).
DEFAULT_PRUNER_STARTUP_TRIALS = 5
DEFAULT_PRUNE_AFTER_EPOCH = 2

# training options the study sets for every trial (not searched, not in train_options)
STUDY_OWNED = frozenset({"data", "out", "epochs", "seed"})



def parse_duration(text: str | float | int | None, option: str = "--timeout") -> float | None:
    """``"90s"``, ``"30m"``, ``"1.5h"`` or plain seconds -> seconds (see :func:`lensforge.planning.parse_duration`)."""
    return _parse_duration(text, option)


class TuneConfig(BaseModel):
    """Everything that decides a tuning study; trials' training configs are built from it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = "builtin:digits"
    model: str = "auto"  # auto: the TinyCNN sizes for small images are searched; a name is kept fixed
    trials: int = Field(DEFAULT_TRIALS, ge=1, le=100_000)  # finished trials wanted in the study, across runs
    timeout_s: float | None = Field(None, gt=0)  # start no trial after this many seconds of this process
    objectives: tuple[str, ...] = ("accuracy",)  # accuracy first; latency_ms, size_mb make it multi-objective
    study: str | None = None  # default: the output folder's name
    storage: str | None = None  # SQLAlchemy URL or journal file path; default OUT/study.journal
    out: str | None = None  # default runs/tune (then -2, -3, ...)
    seed: int = Field(0, ge=0)  # sampler seed, and every trial's training seed (so one split for all)
    epochs: int = Field(DEFAULT_TRIAL_EPOCHS, ge=1, le=10_000)  # per trial, and for the best config
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = Field(DEFAULT_PRUNER_STARTUP_TRIALS, ge=0)
    prune_after_epoch: int = Field(DEFAULT_PRUNE_AFTER_EPOCH, ge=1)  # earliest epoch a trial may be pruned at
    max_train_batches: int | None = Field(None, ge=1)  # per epoch, for smoke tests
    # more TrainConfig values for every trial (e.g. {"warmup_epochs": 0}); the searched ones win
    train_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("objectives", mode="before")
    @classmethod
    def _split_objectives(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from lensforge.tune.objectives import check_objectives

        return check_objectives(value)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def trial_config(self, params: dict[str, Any], run_dir: str | Path) -> TrainConfig:
        """A trial's training config: defaults <- the study's settings <- train_options <- ``params``."""
        from lensforge.train.config import make_config

        clash = sorted(STUDY_OWNED & set(self.train_options))
        if clash:
            raise UsageError(f"train_options: {', '.join(clash)} is set by the study itself")
        values: dict[str, Any] = {"data": self.data, "model": self.model, "epochs": self.epochs, "seed": self.seed}
        if self.max_train_batches is not None:
            values["max_train_batches"] = self.max_train_batches
        values.update(self.train_options)
        values.update(params)
        values["out"] = str(run_dir)
        return make_config(values, where="trial configuration")
