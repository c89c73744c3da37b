"""Tuning as a step of autopilot (``autopilot --tune N``): inside the time budget, then re-checked.

The budget is split: tuning (the trials and the re-check) gets as much time as the final
training. With ``--time-budget`` that is half of what the budget leaves for training after the
pilot, data loading and the steps after training; without one, the default budget grows by
that much, so the final training keeps its default length. Each trial runs a short epoch
count taken from the pilot's epoch time, so that the N trials and the re-check fit the share;
the study starts no trial after its share is spent.

The re-check: one seed can crown a configuration by luck. In our benchmark (BENCHMARKS.md,
"Hyperparameter tuning") the tuned configuration won by 5 points on the seed it was tuned on
and fell to chance level on another, where the default reached 64%. So the study's best is
trained again beside the default with the next seed, on the same split (the final run's test
images stay out of every decision), and replaces the default only when it is at least as good
there on validation accuracy. Otherwise the default is kept, and the summary says why.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from lensforge.errors import LensforgeError, UsageError
from lensforge.tune.config import DEFAULT_TRIAL_EPOCHS, STUDY_OWNED

if TYPE_CHECKING:
    from lensforge.planning import Plan
    from lensforge.train.config import TrainConfig

TUNE_SHARE = 0.5  # of the training time a --time-budget leaves: tuning and the final training get as much
RECHECK_RUNS = 2  # the default and the tuned configuration, trained again with the next seed
# Per trial, beyond its epochs: loading the run, checkpoints, ONNX export with its parity check and
# scoring the bundle. Measured ~4.5 s for tinycnn_xs on 2 loaded cores; the study's timeout absorbs errors.
TRIAL_OVERHEAD_S = 5.0
RECHECK_OVERHEAD_S = 2.0  # a re-check run is not exported
STUDY_OVERHEAD_S = 8.0  # the study's end: the best run copied and tested, trials.csv, plots, reports
MIN_TIMEOUT_S = 1.0  # the first trial (the default configuration) always starts
RECHECK_DIR = "recheck"


@dataclass(frozen=True)
class TuneShare:
    """How a run's time budget is split between tuning and the final training (seconds)."""

    budget_s: float  # the whole run, tuning included
    tune_s: float  # the trials, the study's end and the re-check
    trial_epochs: int
    timeout_s: float  # the study starts no trial after this
    trial_s: float  # estimated seconds per trial
    budget_given: bool

    def trials_that_fit(self) -> int:
        return max(1, int(self.timeout_s // self.trial_s) + 1)

    def describe(self, trials: int, seed: int) -> str:
        """One line for people: what the tuning will do, and which part of the budget it takes."""
        why = ("half of the budget's training time" if self.budget_given else
               f"as long as the final training; no --time-budget, so the budget grows to {self.budget_s:.0f} s")
        fit = self.trials_that_fit()
        cut = f" (about {fit} fit; the rest are not started)" if fit < trials else ""
        return (f"tuning first: up to {trials} trials of {self.trial_epochs} epoch{'s' * (self.trial_epochs != 1)}"
                f"{cut}, then the best re-checked against the default on seed {seed + 1}: ~{self.tune_s:.0f} s "
                f"of the {self.budget_s:.0f} s budget ({why})")

    def to_json(self) -> dict[str, Any]:
        return {"total": round(self.budget_s, 1), "tune": round(self.tune_s, 1),
                "final": round(self.budget_s - self.tune_s, 1)}


def share_budget(plan: Plan, trials: int, *, max_epochs: int) -> TuneShare:
    """Split ``plan``'s budget (the pilot's plan of the untuned run) for ``trials`` trials first.

    ``max_epochs`` caps the trials' length (the run's --epochs); they get at most
    :data:`~lensforge.tune.config.DEFAULT_TRIAL_EPOCHS`, and at least one.
    """
    if plan.budget_given:
        tune_s, budget_s = plan.train_limit_s * TUNE_SHARE, plan.budget_s
    else:  # the final training keeps what the default budget gives it; tuning gets as much again
        tune_s = plan.train_limit_s
        budget_s = plan.budget_s + tune_s
    runs_s = tune_s - STUDY_OVERHEAD_S - trials * TRIAL_OVERHEAD_S - RECHECK_RUNS * RECHECK_OVERHEAD_S
    epochs = int(runs_s // ((trials + RECHECK_RUNS) * plan.epoch_s)) if runs_s > 0 else 0
    epochs = max(1, min(epochs, max_epochs, DEFAULT_TRIAL_EPOCHS))
    trial_s = epochs * plan.epoch_s + TRIAL_OVERHEAD_S
    recheck_s = RECHECK_RUNS * (epochs * plan.epoch_s + RECHECK_OVERHEAD_S)
    # a trial started just before the timeout still finishes inside the share
    timeout_s = max(MIN_TIMEOUT_S, tune_s - recheck_s - STUDY_OVERHEAD_S - trial_s)
    return TuneShare(budget_s, tune_s, epochs, timeout_s, trial_s, plan.budget_given)


@dataclass
class TuneOutcome:
    """What the final training starts from, and summary.json's ``tune`` block."""

    config: TrainConfig
    adopted: bool
    block: dict[str, Any]


def tune_then_recheck(cfg: TrainConfig, share: TuneShare, *, trials: int, out: Path,
                      console: Console) -> TuneOutcome:
    """Run the study into ``out``, re-check its best on seed ``cfg.seed + 1``, and choose the config.

    ``cfg`` is the untuned run's config (its epochs are the final training's most); the
    returned config is it or the tuned one, with ``cfg``'s out, seed and epochs.
    """
    from lensforge.train.config import load_config_file, make_config
    from lensforge.tune.study import tune

    started = time.perf_counter()
    block: dict[str, Any] = {"trials_requested": trials, "trial_epochs": share.trial_epochs,
                             "budget_split_s": share.to_json(), "study": str(out), "seed": cfg.seed}
    try:
        study = tune(cfg.data, model=cfg.model, trials=trials, timeout_s=share.timeout_s, out=out, seed=cfg.seed,
                     epochs=share.trial_epochs, max_train_batches=cfg.max_train_batches,
                     train_options=_train_options(cfg), console=console)
    except UsageError:
        raise
    except LensforgeError as e:  # no trial completed: nothing to adopt, the default is trained as usual
        return _outcome(cfg, block, False, f"tuning gave no result ({e})", started, console)
    best = study.summary["best"]
    default_trial = next((t for t in study.trials if t["number"] == 0), None)
    block.update(trials_run=sum(study.summary["counts"].values()), counts=study.summary["counts"],
                 best_trial=best["trial"], best_params=best["params"], best_config=str(study.best_config),
                 report=str(study.report),
                 study_val_acc={"default": default_trial and default_trial["values"].get("accuracy"),
                                "tuned": best["values"].get("accuracy")})
    if best["trial"] == 0:  # trial 0 of a new study is the default configuration
        return _outcome(cfg, block, False, "the study's best trial was trial 0, the default itself", started,
                        console)
    tuned = make_config({**load_config_file(study.best_config), "out": cfg.out, "seed": cfg.seed,
                         "epochs": cfg.epochs, "time_limit_s": cfg.time_limit_s}, where=str(study.best_config))
    recheck = _recheck(cfg, tuned, study.best_run / "splits.json", share.trial_epochs, out / RECHECK_DIR, console)
    block["recheck"] = recheck
    adopted, reason = decide(recheck)
    return _outcome(tuned if adopted else cfg, block, adopted, reason, started, console)


def _outcome(config: TrainConfig, block: dict[str, Any], adopted: bool, reason: str, started: float,
             console: Console) -> TuneOutcome:
    block.update(adopted=adopted, reason=reason, time_s=round(time.perf_counter() - started, 1))
    verdict = "[bold]adopted the tuned configuration[/]" if adopted else "kept the default configuration"
    console.print(f"{verdict}: {escape(reason)}")
    return TuneOutcome(config, adopted, block)


def _train_options(cfg: TrainConfig) -> dict[str, Any]:
    """The run's own training options (those not at their defaults) for every trial; the study sets the rest."""
    own = cfg.model_dump(exclude_defaults=True)
    return {k: v for k, v in own.items() if k not in STUDY_OWNED | {"model", "max_train_batches", "time_limit_s"}}


def _recheck(default: TrainConfig, tuned: TrainConfig, splits_file: Path, epochs: int, out: Path,
             console: Console) -> dict[str, Any]:
    """Both configurations trained again with the next seed on the study's split: val accuracy of each."""
    seed = default.seed + 1
    console.print(f"re-checking the best against the default on seed {seed} ({epochs} epoch{'s' * (epochs != 1)} "
                  "each, same split) ...")
    recheck: dict[str, Any] = {"seed": seed, "epochs": epochs, "metric": "val_acc"}
    for name, cfg in (("default", default), ("tuned", tuned)):
        run_cfg = cfg.model_copy(update={"seed": seed, "epochs": epochs, "splits_file": str(splits_file),
                                         "time_limit_s": None, "out": str(out / name)})
        recheck[name], recheck[f"{name}_error"] = _val_acc(run_cfg)
    return recheck


def _val_acc(cfg: TrainConfig) -> tuple[float | None, str | None]:
    """(best validation accuracy, None), or (None, why) when training fails on its own configuration."""
    from lensforge.train import train

    try:
        result = train(cfg, console=Console(quiet=True), show_progress=False)
    except UsageError:
        raise
    except LensforgeError as e:  # e.g. diverged: a configuration that fails on this seed is not adopted
        return None, str(e)
    return result.best_val_acc, None


def decide(recheck: dict[str, Any]) -> tuple[bool, str]:
    """Adopt the tuned configuration only when it is at least as good as the default on the re-check seed."""
    seed, default, tuned = recheck["seed"], recheck.get("default"), recheck.get("tuned")
    if tuned is None:
        return False, f"the tuned configuration failed on seed {seed}: {recheck.get('tuned_error')}"
    if default is None:
        return True, (f"the default configuration failed on seed {seed} ({recheck.get('default_error')}); "
                      f"the tuned one reached val accuracy {tuned:.1%}")
    if math.isclose(tuned, default) or tuned > default:
        return True, f"on seed {seed} it is at least as good as the default: val accuracy {tuned:.1%} vs {default:.1%}"
    return False, (f"on seed {seed} it is worse than the default: val accuracy {tuned:.1%} vs {default:.1%} "
                   "(the study's win did not hold on another seed)")
