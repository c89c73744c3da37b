"""``tune(data, ...)``: an Optuna study whose trials are ordinary lensforge training runs.

Each trial trains ``OUT/trials/NNNN`` with a configuration drawn from the search space
(:mod:`lensforge.tune.space`), reports its validation accuracy after every epoch (the
pruner stops trials that fall behind), exports its ONNX bundle and is scored on it
(:mod:`lensforge.tune.objectives`). The study lives in a storage (:mod:`lensforge.tune.storage`)
so that a killed tune resumes and several processes can work on one study. At the end
the best configuration is written as ``best.yaml``, its run (re-used from its trial) as
``OUT/best`` with the bundle evaluated on the test split, and ``trials.csv``, ``tune.json``,
plots and ``report.html`` describe the study (:mod:`lensforge.tune.results`).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from lensforge.data.sources import open_source
from lensforge.errors import LensforgeError, UsageError
from lensforge.train.config import make_config_of
from lensforge.tune.config import (
    DEFAULT_PRUNE_AFTER_EPOCH,
    DEFAULT_PRUNER_STARTUP_TRIALS,
    DEFAULT_TRIAL_EPOCHS,
    DEFAULT_TRIALS,
    TuneConfig,
)
from lensforge.tune.objectives import objective
from lensforge.tune.results import TuneResult, finish, trial_line, write_trials_csv
from lensforge.tune.space import SearchSpace, check_space, default_space, suggest
from lensforge.tune.storage import fail_stale_trials, mark_owner, open_storage
from lensforge.utils.io import fresh_dir

TRIALS_DIR = "trials"
SETTINGS_ATTR = "lensforge"  # study user attribute: what the study was started with
# a trial counts toward --trials once it completed, was pruned, or failed on its own
# configuration (a lensforge error); a trial cut short by a dead or interrupted process does not
ERROR_ATTR, STALE_ATTR = "error", "stale"
# TPE: random trials before it models the results. Optuna's default is 10; a third of a
# small study (at least 3) leaves more of the budget to the model-guided trials.
TPE_MAX_STARTUP_TRIALS = 10


def tune(data: str = "builtin:digits", *, model: str = "auto", trials: int = DEFAULT_TRIALS,
         timeout_s: float | None = None, objectives: str | tuple[str, ...] = ("accuracy",), study: str | None = None,
         storage: str | None = None, out: str | Path | None = None, seed: int = 0,
         epochs: int = DEFAULT_TRIAL_EPOCHS, pruner: str = "median",
         pruner_startup_trials: int = DEFAULT_PRUNER_STARTUP_TRIALS, prune_after_epoch: int = DEFAULT_PRUNE_AFTER_EPOCH,
         max_train_batches: int | None = None, train_options: dict[str, Any] | None = None,
         space: SearchSpace | None = None, console: Console | None = None) -> TuneResult:
    """Run (or resume, or join) a tuning study; the options are :class:`~lensforge.tune.config.TuneConfig`'s.

    ``space`` replaces the default search space (:func:`~lensforge.tune.space.default_space`);
    ``train_options`` are more training options for every trial. Raises
    :class:`~lensforge.errors.UsageError` for bad options and :class:`~lensforge.errors.LensforgeError`
    when no trial completed.
    """
    values = dict(data=data, model=model, trials=trials, timeout_s=timeout_s, objectives=objectives, study=study,
                  storage=storage, out=None if out is None else str(out), seed=seed, epochs=epochs, pruner=pruner,
                  pruner_startup_trials=pruner_startup_trials, prune_after_epoch=prune_after_epoch,
                  max_train_batches=max_train_batches, train_options=train_options or {})
    return run_study(make_config_of(TuneConfig, values), space=space, console=console)


def run_study(cfg: TuneConfig, *, space: SearchSpace | None = None, console: Console | None = None) -> TuneResult:
    """:func:`tune` on a ready-made config."""
    optuna = import_optuna()

    console = console or Console(stderr=True)
    started = time.perf_counter()
    out_dir = Path(cfg.out) if cfg.out else fresh_dir("runs", "tune")
    if (out_dir / "run.json").exists():
        raise UsageError(f"--out '{out_dir}' is a training run folder; choose another folder for the study")
    _check_model(cfg.model)
    source = open_source(cfg.data)
    space = check_space(space) if space is not None else _default_space_for(cfg, source)
    defaults = _defaults_in_space(cfg, space, source)  # also: bad train_options fail before any trial
    study_name = cfg.study or out_dir.resolve().name
    with _quiet_optuna(optuna):
        storage, storage_name = open_storage(cfg.storage, out_dir)
        study = _open_study(optuna, cfg, storage, study_name, space)
        if not study.trials:  # a new study starts from what `lensforge train` would do
            study.enqueue_trial(defaults, skip_if_exists=True)
        stale = fail_stale_trials(study)
        if stale:
            console.print(f"marked FAIL the trials left running by a process that ended: {stale}")
        _announce(console, cfg, study, study_name, storage_name, out_dir)
        _run_trials(optuna, study, cfg, space, out_dir, console, started)
        return finish(study, cfg, out_dir=out_dir, study_name=study_name, storage_name=storage_name,
                      console=console, started=started)


def import_optuna() -> Any:
    """Optuna, or ``ModuleNotFoundError(name="optuna")``: the CLI turns it into the install hint."""
    try:
        import optuna
    except ModuleNotFoundError as e:
        if e.name != "optuna":
            raise
        raise ModuleNotFoundError("No module named 'optuna'", name="optuna") from None  # CLI: install hint
    return optuna


@contextlib.contextmanager
def _quiet_optuna(optuna: Any) -> Iterator[None]:
    """Our own one line per trial instead of Optuna's INFO log; no experimental-feature warnings."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def _check_model(name: str) -> None:
    """An unknown --model fails here, once, not in every trial."""
    import timm

    from lensforge.models.registry import MODELS, create_model

    if name != "auto" and name not in MODELS and not timm.is_model(name):
        create_model(name, num_classes=1)  # raises the registry's message, with close matches


def _default_space_for(cfg: TuneConfig, source: Any) -> SearchSpace:
    from lensforge.train.setup import auto_image_size, auto_model, probe_size

    native = probe_size(source)
    model, pretrained = cfg.model, cfg.train_options.get("pretrained")
    if model == "auto":
        model, auto_pretrained = auto_model(native)
        pretrained = pretrained or auto_pretrained
    base_size = cfg.train_options.get("image_size") or auto_image_size(model, native, pretrained)
    return default_space(cfg.model, native, base_size)


def _defaults_in_space(cfg: TuneConfig, space: SearchSpace, source: Any) -> dict[str, Any]:
    """The values `lensforge train` would use (its "auto" choices resolved), for the parameters that can hold them.

    The first trial of a new study trains them: the study starts from a known-good point,
    and its best is never worse on validation than the defaults (same seed, same split).
    """
    from lensforge.train.setup import resolve

    train_cfg = cfg.trial_config({}, "unused")
    resolved = resolve(train_cfg, source)
    values = {**train_cfg.model_dump(), "lr": resolved.lr, "augment": resolved.augment,
              "model": resolved.model_name, "image_size": resolved.image_size, "batch_size": resolved.batch_size}
    return {p.name: values[p.name] for p in space if p.name in values and p.holds(values[p.name])}


def _settings(cfg: TuneConfig, space: SearchSpace) -> dict[str, Any]:
    """What must match for a process to join an existing study (its results mean the same)."""
    return {"data": cfg.data, "model": cfg.model, "epochs": cfg.epochs, "seed": cfg.seed,
            "objectives": list(cfg.objectives), "max_train_batches": cfg.max_train_batches,
            "train_options": dict(sorted(cfg.train_options.items())), "space": [p.name for p in space]}


def _open_study(optuna: Any, cfg: TuneConfig, storage: Any, name: str, space: SearchSpace) -> Any:
    directions = [objective(n).direction for n in cfg.objectives]
    study = optuna.create_study(study_name=name, storage=storage, directions=directions, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise UsageError(f"study '{name}' optimises {len(study.directions)} objective(s) in other directions; "
                         "choose another --study or the same --objectives")
    wanted, saved = _settings(cfg, space), study.user_attrs.get(SETTINGS_ATTR)
    if saved is None:
        study.set_user_attr(SETTINGS_ATTR, wanted)
    elif saved != wanted:
        differ = [k for k in wanted if saved.get(k) != wanted[k]]
        raise UsageError(f"study '{name}' was started with other settings ({', '.join(differ)}: "
                         f"{', '.join(repr(saved.get(k)) for k in differ)}); choose another --study or --out")
    n_before = len(study.trials)
    # seeded by the trials already there: a resumed study does not replay its first random draws
    sampler = optuna.samplers.TPESampler(seed=cfg.seed + n_before, multivariate=True, constant_liar=True,
                                         n_startup_trials=min(TPE_MAX_STARTUP_TRIALS, max(3, cfg.trials // 3)))
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=_pruner(optuna, cfg))


def _pruner(optuna: Any, cfg: TuneConfig) -> Any:
    if cfg.pruner == "none" or cfg.multi_objective:  # Optuna prunes single-objective studies only
        return optuna.pruners.NopPruner()
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min(cfg.prune_after_epoch, cfg.epochs),
                                              max_resource=cfg.epochs)
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                       n_warmup_steps=cfg.prune_after_epoch)


def counted(trial: Any) -> bool:
    """Whether a finished trial counts toward the study's --trials."""
    state = trial.state.name
    return state in ("COMPLETE", "PRUNED") or (state == "FAIL" and ERROR_ATTR in trial.user_attrs)


def _announce(console: Console, cfg: TuneConfig, study: Any, name: str, storage: str, out_dir: Path) -> None:
    done = sum(counted(t) for t in study.get_trials(deepcopy=False))
    resumed = f", {done} trials already done" if done else ""
    epochs = f"{cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''}"
    console.print(f"tuning study '{name}' ({', '.join(cfg.objectives)}) in {storage}{resumed}: "
                  f"{cfg.trials} trials of {epochs} on {cfg.data} -> {out_dir}")


def _run_trials(optuna: Any, study: Any, cfg: TuneConfig, space: SearchSpace, out_dir: Path, console: Console,
                started: float) -> None:
    """One trial at a time until the study has ``cfg.trials`` (counting other processes' running ones)."""

    def after_trial(study: Any, trial: Any) -> None:
        console.print(trial_line(trial, cfg.objectives))
        write_trials_csv(study, cfg.objectives, out_dir)

    run_one = _objective(optuna, cfg, space, out_dir)
    while True:
        trials = study.get_trials(deepcopy=False)
        if sum(counted(t) for t in trials) + sum(t.state.name == "RUNNING" for t in trials) >= cfg.trials:
            return
        if cfg.timeout_s is not None and time.perf_counter() - started > cfg.timeout_s:
            console.print(f"timeout {cfg.timeout_s:g}s: no more trials started")
            return
        study.optimize(run_one, n_trials=1, catch=(LensforgeError,), callbacks=[after_trial],
                       gc_after_trial=False)


def _objective(optuna: Any, cfg: TuneConfig, space: SearchSpace, out_dir: Path) -> Any:
    from lensforge.deploy.from_run import export_run
    from lensforge.train import train

    quiet = Console(quiet=True)  # the trial's own progress lines would drown the study's

    def run_trial(trial: Any) -> float | tuple[float, ...]:
        mark_owner(trial)
        run_dir = out_dir / TRIALS_DIR / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        params = suggest(trial, space)
        try:
            result = train(cfg.trial_config(params, run_dir), console=quiet, show_progress=False,
                           on_epoch_end=_reporter(optuna, trial, prune=not cfg.multi_objective))
            trial.set_user_attr("epochs", len(result.history))
            bundle = export_run(run_dir)
            values = tuple(objective(name).measure(bundle) for name in cfg.objectives)
        except LensforgeError as e:
            trial.set_user_attr(ERROR_ATTR, str(e))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(STALE_ATTR, "interrupted")
            raise
        return values if cfg.multi_objective else values[0]

    return run_trial


def _reporter(optuna: Any, trial: Any, *, prune: bool) -> Any:
    """The per-epoch callback: report val accuracy; stop the trial when the pruner says so."""

    def on_epoch_end(row: dict[str, Any]) -> None:
        trial.set_user_attr("epochs", row["epoch"])
        if not prune:
            return
        trial.report(row["val_acc"], row["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"val accuracy {row['val_acc']:.1%} after epoch {row['epoch']}")

    return on_epoch_end
