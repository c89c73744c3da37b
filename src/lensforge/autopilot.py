"""``autopilot()``: the main job — data to evaluated bundle and report, with good defaults.

Split, choose a model suited to the data and image size, train, export the
ONNX bundle, evaluate the *bundle* on the test split (the number that ships),
calibrate it (temperature scaling), fit its guardrails (OOD detector, input-quality
reference, abstain threshold: they ship inside the bundle), run the quick corruption
suite on it, write the report, and ``summary.json``. With a budget, candidates are
trained and compressed first and the chosen artifact is shipped, with the same
guardrails and quick suite fitted on its own outputs. With ``tune_trials``, an Optuna
study runs first inside the time budget (:mod:`lensforge.tune.budgeted`) and its best
configuration replaces the default only if it holds on a second seed. With ``mlflow_uri``,
the final training and the shipped bundle are logged to MLflow (:mod:`lensforge.train.tracking`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from lensforge.data.sources import task_of
from lensforge.errors import ChanceLevelError, UsageError
from lensforge.evaluate.metrics import chance_level, chance_message
from lensforge.planning import plan_run
from lensforge.utils.io import atomic_write_json, fresh_dir

if TYPE_CHECKING:
    from lensforge.train.tracking import Tracker

DEFAULT_DATA = "builtin:digits"
LR_FIND_STEPS = 60  # range-test steps when autopilot trains a model with no measured default lr
DEFAULT_EPOCHS = 30  # with early stopping; TinyCNN on digits converges in ~20


@dataclass
class AutopilotResult:
    """Where everything went, and the headline numbers."""

    out: Path
    summary: dict[str, Any]

    def summary_lines(self) -> list[str]:
        """What the CLI prints at the end: the shipped numbers, the guardrails, where the files are."""
        s, lines = self.summary, []
        test, guards = s["metrics"]["test"], s.get("guardrails") or {}
        if s.get("task") == "detection":
            return self._detection_lines()
        ece = f"ECE {test['ece']:.3f}"
        if test.get("ece_uncalibrated") is not None:
            ece += f" calibrated ({test['ece_uncalibrated']:.3f} before)"
        lines.append(f"[bold green]done[/] in {s['timings_s']['total']:.0f}s: {s['model']} on {s['data']}: test "
                     f"accuracy {test['accuracy']:.2%}, macro-F1 {test['macro_f1']:.3f}, {ece} "
                     f"(measured on the ONNX bundle)")
        if guards.get("skipped"):
            lines.append(f"[yellow]no guardrails shipped:[/] {guards['skipped']}")
        elif guards:
            stress = guards.get("mean_corruption_error")
            lines.append(f"guardrails shipped in the bundle: temperature {guards['temperature']:.2f}, OOD detector "
                         f"{guards['ood_detector']}, input-quality checks, abstain threshold"
                         + (f"; mean corruption error {stress:.1%} (quick suite)" if stress is not None else ""))
        if s.get("tune"):
            lines.append(_tune_line(s["tune"]))
        if s.get("budget_s"):
            total, budget = s["timings_s"]["total"], s["budget_s"]
            verdict = "within" if total <= budget else "[yellow]over[/]"
            lines.append(f"time: {total:.0f} s, {verdict} the {budget:.0f} s budget "
                         f"(planned {s['plan']['epochs']} epochs, ran {s.get('epochs_run', '?')})")
        if s.get("at_chance"):
            lines.append(f"[bold red]at chance level:[/] {s['diagnosis']}")
        lines.append(f"report:  {s['report']}\nbundle:  {s['bundle']}\nsummary: {self.out / 'summary.json'}")
        return lines

    def _detection_lines(self) -> list[str]:
        s = self.summary
        test, stress = s["metrics"]["test"], s.get("stress") or {}

        def number(value: Any) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        lines = [f"[bold green]done[/] in {s['timings_s']['total']:.0f}s: {s['model']} on {s['data']}: test "
                 f"mAP@[.5:.95] {number(test.get('map50_95'))}, mAP50 {number(test.get('map50'))}, precision "
                 f"{test.get('precision', 0):.1%} and recall {test.get('recall', 0):.1%} at score >= "
                 f"{test.get('score_threshold', 0):.2f} (measured on the ONNX bundle)"]
        if stress.get("mean_corruption_error") is not None:
            lines.append(f"quick corruption suite: mean mAP {1 - stress['mean_corruption_error']:.3f} under "
                         f"corruptions vs {number(stress.get('clean_map'))} clean")
        if s.get("guardrails", {}).get("skipped"):
            lines.append(f"[yellow]no guardrails shipped:[/] {s['guardrails']['skipped']}")
        if s.get("at_chance"):
            lines.append(f"[bold red]learned nothing:[/] {s['diagnosis']}")
        lines.append(f"report:  {s['report']}\nbundle:  {s['bundle']}\nsummary: {self.out / 'summary.json'}")
        return lines

    def raise_if_failed(self) -> None:
        """Raise :class:`ChanceLevelError` when the shipped model learned nothing (exit code 4)."""
        if self.summary.get("at_chance"):
            raise ChanceLevelError(f"{self.summary['diagnosis']} (report: {self.summary['report']})")


def autopilot(data: str | None = None, out: str | Path | None = None, *, model: str = "auto",
              epochs: int | None = None, seed: int = 0, console: Console | None = None,
              show_progress: bool = True, budget: Any = None, guardrails: bool = True,
              time_budget_s: float | None = None, tune_trials: int | None = None, mlflow_uri: str | None = None,
              **train_overrides: Any) -> AutopilotResult:
    """Run the whole chain on ``data`` (default ``builtin:digits``) into ``out`` (never overwritten).

    With a :class:`lensforge.select.Budget`, candidates are trained, compressed and measured, and
    the best artifact that fits is shipped (see :func:`lensforge.select.select`). A model at chance
    level gets no guardrails; the summary says ``at_chance`` with a diagnosis (the CLI exits with 4).
    Without a latency/size budget the run is planned to fit ``time_budget_s`` (seconds; default:
    what the data needs, within :data:`lensforge.planning.DEFAULT_BUDGET_S`), see
    :func:`lensforge.planning.plan_run`; ``summary.json`` then has ``budget_s`` and ``plan``.
    ``tune_trials`` (needs the ``tune`` extra) tunes first, see :mod:`lensforge.tune.budgeted`;
    ``summary.json`` then has a ``tune`` block. ``mlflow_uri`` (the ``tracking`` extra) logs the
    run to MLflow (:mod:`lensforge.train.tracking`); a URI that cannot be opened fails before any work.
    """
    from lensforge.train.tracking import mlflow_tracking

    console = console or Console(stderr=True)
    out_dir = Path(out) if out is not None else fresh_dir("runs", "autopilot")
    if out is not None and (out_dir / "summary.json").exists():
        out_dir = fresh_dir(out_dir.parent, out_dir.name)
    _check_options(budget, time_budget_s, tune_trials)
    with mlflow_tracking(mlflow_uri, run_name=out_dir.name, command="autopilot", console=console) as tracker:
        if budget is not None and task_of(data or DEFAULT_DATA) == "detection":
            raise UsageError("a latency/size budget (--max-latency-ms, --max-size-mb) is not built for detection "
                             "yet: drop it, then `lensforge compress RUN --quantize int8` and `lensforge bench`")
        if budget is not None:
            result = _budgeted(data or DEFAULT_DATA, out_dir, budget, epochs=epochs, seed=seed, console=console,
                               guardrails=guardrails, show_progress=show_progress,
                               candidates=train_overrides.pop("candidates", None))
        elif task_of(data or DEFAULT_DATA) == "detection":
            result = _single_detection(data or DEFAULT_DATA, out_dir, model=model, epochs=epochs, seed=seed,
                                       console=console, show_progress=show_progress, guardrails=guardrails,
                                       time_budget_s=time_budget_s, tune_trials=tune_trials, tracker=tracker,
                                       **train_overrides)
        else:
            result = _single(data or DEFAULT_DATA, out_dir, model=model, epochs=epochs, seed=seed, console=console,
                             show_progress=show_progress, guardrails=guardrails, time_budget_s=time_budget_s,
                             tune_trials=tune_trials, tracker=tracker, **train_overrides)
        tracker.log_autopilot(result.summary, out_dir)
    return result


def _check_options(budget: Any, time_budget_s: float | None, tune_trials: int | None) -> None:
    """Options that cannot work together, and a missing extra, fail before anything runs."""
    if budget is not None and time_budget_s is not None:
        raise UsageError("--time-budget cannot yet be combined with a latency/size budget; give one of them")
    if tune_trials is None:
        return
    if tune_trials < 1:
        raise UsageError(f"--tune: {tune_trials} is not at least 1")
    if budget is not None:
        raise UsageError("--tune cannot yet be combined with a latency/size budget; give one of them")
    from lensforge.tune.study import import_optuna

    import_optuna()  # without the tune extra: the CLI's install hint, before the pilot


def _single(data: str, out_dir: Path, *, model: str, epochs: int | None, seed: int, console: Console,
            show_progress: bool, guardrails: bool = True, time_budget_s: float | None = None,
            tune_trials: int | None = None, tracker: Tracker, **train_overrides: Any) -> AutopilotResult:
    from lensforge.train import resolve_config, train

    started, timings = time.perf_counter(), {}
    cfg = resolve_config(None, data=data, model=model, out=str(out_dir),
                         epochs=epochs or DEFAULT_EPOCHS, seed=seed, **train_overrides)
    console.rule(f"[bold]lensforge autopilot[/]: {cfg.data} -> {out_dir}")
    console.print("measuring this machine on the model and data (pilot) ...")
    plan = plan_run(cfg, budget_s=time_budget_s, include_after=guardrails)
    timings["plan"] = time.perf_counter() - started
    budget_s, tuned = plan.budget_s, {}
    if tune_trials:
        cfg, plan, budget_s, tuned = _tune_first(cfg, plan, tune_trials, out_dir, console, started, guardrails)
        timings["tune"] = tuned["time_s"]
    console.print(plan.describe())
    lr_found = _lr_find_first(cfg, out_dir, console) if not tuned else {}
    limit_s = plan.train_limit_s - lr_found.get("time_s", 0.0) if plan.train_limit_s else None
    cfg = resolve_config(None, **{**cfg.model_dump(), "epochs": plan.epochs, "lr": lr_found.get("lr", cfg.lr),
                                  "time_limit_s": max(limit_s, 1.0) if limit_s is not None else None})
    tracker.log_config(cfg)
    result = train(cfg, console=console, show_progress=show_progress, on_epoch_end=tracker.epoch_callback())
    timings.update({f"train_{k}" if k != "train" else k: v for k, v in result.timings_s.items()})
    summary = _ship_single(cfg.data, result, out_dir, console, timings, seed, guardrails, show_progress, started)
    summary.update({"budget_s": round(budget_s, 1), "plan": plan.to_json(), **({"tune": tuned} if tuned else {}),
                    **({"lr_find": lr_found} if lr_found else {}),
                    **_chance_verdict(summary["metrics"]["test"], out_dir)})
    atomic_write_json(out_dir / "summary.json", summary)
    return AutopilotResult(out_dir, summary)


DETECTION_BUDGET_S = 600.0  # default wall clock for the whole detection chain (the 10 minutes)
DETECTION_TRAIN_SHARE = 0.8  # of the budget for training: export, evaluation, stress and report take the rest
DETECTION_EPOCHS = 60  # the most; the time limit and early stopping on val mAP usually end training first


def _single_detection(data: str, out_dir: Path, *, model: str, epochs: int | None, seed: int, console: Console,
                      show_progress: bool, guardrails: bool = True, time_budget_s: float | None = None,
                      tune_trials: int | None = None, tracker: Tracker, **train_overrides: Any) -> AutopilotResult:
    """Detection: train within the budget, export, evaluate the bundle, quick corruption suite, report."""
    from lensforge.deploy.from_run import export_run
    from lensforge.evaluate import evaluate
    from lensforge.report import write_report
    from lensforge.stress.suite import StressConfig, stress
    from lensforge.train import resolve_config, train

    if tune_trials:
        raise UsageError("--tune is not built for detection yet: drop it")
    started, timings = time.perf_counter(), {}
    budget_s = time_budget_s if time_budget_s is not None else DETECTION_BUDGET_S
    cfg = resolve_config(None, data=data, model=model, out=str(out_dir), epochs=epochs or DETECTION_EPOCHS,
                         seed=seed, time_limit_s=max(1.0, budget_s * DETECTION_TRAIN_SHARE), **train_overrides)
    console.rule(f"[bold]lensforge autopilot[/] (detection): {cfg.data} -> {out_dir}")
    console.print(f"training for at most {cfg.time_limit_s:.0f} s of the {budget_s:.0f} s budget "
                  f"(up to {cfg.epochs} epochs, best epoch by val mAP@[.5:.95])")
    tracker.log_config(cfg)
    result = train(cfg, console=console, show_progress=show_progress, on_epoch_end=tracker.epoch_callback())
    timings.update({f"train_{k}" if k != "train" else k: v for k, v in result.timings_s.items()})
    step = time.perf_counter()
    console.print("exporting the ONNX bundle and checking parity with PyTorch (decoded boxes) ...")
    bundle_dir = export_run(out_dir, show_progress=show_progress)
    timings["export"] = time.perf_counter() - step
    step = time.perf_counter()
    console.print("evaluating the shipped bundle (ONNX Runtime) on the test split ...")
    test = evaluate(bundle_dir, split="test", seed=seed).metrics
    timings["evaluate"] = time.perf_counter() - step
    suite: dict[str, Any] = {}
    if guardrails:  # the robustness half of what ships; OOD/abstain guardrails for detectors are not built yet
        step = time.perf_counter()
        console.print("stress-testing the bundle: quick corruption suite (mAP) and box stability ...")
        suite = stress(bundle_dir, cfg=StressConfig(suite="quick", max_images=200, seed=seed), compare=[],
                       show_progress=show_progress).summary
        timings["stress"] = time.perf_counter() - step
    step = time.perf_counter()
    report = write_report(out_dir)
    timings["report"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started
    summary = {"data": data, "bundle": str(bundle_dir), "report": str(report), "budget_s": round(budget_s, 1),
               **_detection_summary(result, test, suite, timings)}
    atomic_write_json(out_dir / "summary.json", summary)
    return AutopilotResult(out_dir, summary)


def _detection_summary(result: Any, test: dict[str, Any], suite: dict[str, Any],
                       timings: dict[str, float]) -> dict[str, Any]:
    headline = {"map50_95": test.get("map"), **{k: test.get(k) for k in (
        "map50", "map75", "map_small", "map_medium", "map_large", "mar100", "precision", "recall", "f1",
        "score_threshold", "images", "objects", "evaluated")}}
    learned_nothing = (test.get("map50") or 0.0) < 0.01
    return {
        "task": "detection", "model": result.resolved.model_name, "image_size": result.resolved.image_size,
        "run": str(result.run_dir), "metrics": {"test": headline, "val": {"map50_95": result.best_val_acc}},
        "epochs_run": len(result.history), "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "stress": {"clean_map": (suite.get("clean") or {}).get("map"),
                   "mean_corruption_error": suite.get("mean_corruption_error"),
                   "box_stability": suite.get("stability")} if suite else {},
        "guardrails": {"skipped": "OOD and abstain guardrails are not built for detectors yet"},
        "at_chance": learned_nothing,
        **({"diagnosis": f"test mAP50 {headline['map50'] or 0:.3f}: the detector found almost nothing; train "
                         "longer (--time-budget) or check the labels"} if learned_nothing else {}),
    }


def _lr_find_first(cfg: Any, out_dir: Path, console: Console) -> dict[str, Any]:
    """An LR range test when the model is not one whose default learning rate we measured (a timm model
    trained from scratch with no --lr): ``{"lr", "time_s", "plot"}``, or ``{}`` when not needed."""
    from lensforge.models.registry import MODELS
    from lensforge.train.lr_find import lr_find

    if cfg.lr is not None or cfg.model == "auto" or cfg.model in MODELS or cfg.pretrained not in (None, "none"):
        return {}
    console.print(f"{cfg.model} has no measured default learning rate here: LR range test "
                  f"({LR_FIND_STEPS} steps) ...")
    step = time.perf_counter()
    result = lr_find(cfg, steps=LR_FIND_STEPS, out=out_dir / "lr_find")
    spent = time.perf_counter() - step
    console.print(f"learning rate {result.suggested_lr:.3g} from the range test ({spent:.0f} s; plot {result.path})")
    return {"lr": result.suggested_lr, "time_s": round(spent, 2), "plot": str(result.path)}


def _tune_first(cfg: Any, plan: Any, trials: int, out_dir: Path, console: Console, started: float,
                include_after: bool) -> tuple[Any, Any, float, dict[str, Any]]:
    """Tune inside the budget, re-check on a second seed, then plan the final training in the time left.

    Returns the final training's config and plan, the whole run's budget and summary.json's ``tune`` block.
    """
    from lensforge.planning import BudgetTooSmall
    from lensforge.tune.budgeted import share_budget, tune_then_recheck

    share = share_budget(plan, trials, max_epochs=cfg.epochs)
    console.print(share.describe(trials, cfg.seed))
    outcome = tune_then_recheck(cfg, share, trials=trials, out=out_dir / "tune", console=console)
    left_s = share.budget_s - (time.perf_counter() - started)
    console.print(f"planning the final training in the {max(left_s, 0):.0f} s left (pilot) ...")
    try:
        final = plan_run(outcome.config, budget_s=max(left_s, 1.0), include_after=include_after)
    except BudgetTooSmall:  # tuning overran its share: the final training still gets one epoch
        console.print("[yellow]tuning took more than its share of the budget:[/] the final training gets one epoch")
        final = plan_run(outcome.config.model_copy(update={"epochs": 1}), budget_s=None, include_after=include_after)
    return outcome.config, final, share.budget_s, outcome.block


def _ship_single(data: str, result: Any, out_dir: Path, console: Console, timings: dict[str, float], seed: int,
                 guardrails: bool, show_progress: bool, started: float) -> dict[str, Any]:
    """Export the trained run's bundle, ship its guardrails, evaluate it on the test split, write the report."""
    from lensforge.deploy.from_run import export_run
    from lensforge.evaluate import evaluate
    from lensforge.report import write_report

    step = time.perf_counter()
    console.print("exporting the ONNX bundle and checking parity with PyTorch ...")
    val = result.splits.val if len(result.splits.val) else result.splits.train
    # the same export as `lensforge export RUN`: one manifest, whichever command wrote the bundle
    bundle_dir = export_run(out_dir, sample_images=result.table.images[val[:64]], show_progress=show_progress)
    timings["export"] = time.perf_counter() - step

    # a model at chance level on validation gets no guardrails: nothing in it is worth guarding
    at_chance = chance_level(result.table.targets[val], len(result.table.class_names),
                             result.best_val_acc)["at_chance"]
    shipped: dict[str, Any] = {}
    if guardrails and not at_chance:
        blocker = _guardrails_blocker(len(result.splits.val))
        shipped = {"skipped": blocker} if blocker else _ship_guardrails(bundle_dir, None, console, timings, seed,
                                                                        show_progress)

    step = time.perf_counter()
    console.print("evaluating the shipped bundle (ONNX Runtime) on the test split ...")
    test = evaluate(bundle_dir, split="test", seed=seed).metrics  # after calibration: the ECE that ships
    timings["evaluate"] = time.perf_counter() - step
    step = time.perf_counter()
    report = write_report(out_dir)
    timings["report"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started
    return {**_summary(data, result, test, bundle_dir, report, timings), "guardrails": shipped}


def _tune_line(tune: dict[str, Any]) -> str:
    """The tuning step in one line: what ran, how long, and whether its result was adopted and why."""
    ran = tune.get("trials_run")
    trials = f"{ran} of {tune['trials_requested']} trials" if ran is not None else f"{tune['trials_requested']} trials"
    verdict = "adopted the tuned configuration" if tune["adopted"] else "kept the default configuration"
    return (f"tuning: {trials} of {tune['trial_epochs']} epoch{'s' * (tune['trial_epochs'] != 1)} in "
            f"{tune['time_s']:.0f} s; {verdict} ({escape(tune['reason'])}); study: {tune['study']}")


def _guardrails_blocker(num_val: int) -> str | None:
    """Why guardrails cannot be fitted on this little data (None when they can): said, not crashed on."""
    from lensforge.stress.calibration import MIN_SAMPLES

    if num_val < MIN_SAMPLES:
        return (f"only {num_val} validation images; calibration and OOD thresholds need at least {MIN_SAMPLES} "
                "(add images, then run `lensforge calibrate` and `lensforge guard` on the bundle)")
    return None


def _ship_guardrails(bundle_dir: Path, run_dir: Path | None, console: Console, timings: dict[str, float],
                     seed: int, show_progress: bool) -> dict[str, Any]:
    """Calibrate the shipped bundle, fit its OOD/quality/abstain guardrails on its own outputs, stress it.

    ``run_dir`` names the run of a bundle kept outside it (a shipped variant: an int8 model's
    features and confidences are not the fp32 model's, so everything is fitted on the artifact).
    """
    from lensforge.stress.calibration import calibrate
    from lensforge.stress.ood import fit_guardrails
    from lensforge.stress.suite import StressConfig, stress

    step = time.perf_counter()
    console.print("calibrating the bundle (temperature scaling on the validation split) ...")
    calibration = calibrate(bundle_dir, seed=seed, run_dir=run_dir)
    console.print("fitting guardrails: OOD detectors, input-quality reference, abstain threshold ...")
    ood = fit_guardrails(bundle_dir, run_dir=run_dir, seed=seed, show_progress=show_progress)
    timings["guardrails"] = time.perf_counter() - step
    step = time.perf_counter()
    console.print("stress-testing the bundle: quick corruption suite and prediction stability ...")
    suite = stress(bundle_dir, cfg=StressConfig(suite="quick", max_images=1000, seed=seed), compare=[],
                   show_progress=show_progress, run_dir=run_dir).summary
    timings["stress"] = time.perf_counter() - step
    held_out = calibration.summary.get("test", calibration.summary["val"])
    return {"temperature": calibration.temperature, "ece_before": held_out["before"]["ece"],
            "ece_after": held_out["after"]["ece"], "ood_detector": ood["chosen"], "ood_threshold": ood["threshold"],
            "mean_corruption_error": suite["mean_corruption_error"],
            "translate_flip_rate": suite.get("stability", {}).get("target", {}).get("translate_flip_rate")}


def _chance_verdict(test: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``{"at_chance": bool}``, plus a diagnosis (the message and the run's own fit advice) when true."""
    if not test.get("at_chance"):
        return {"at_chance": False}
    diagnosis = chance_message(test, "the model")
    try:
        fit = json.loads((run_dir / "diagnosis.json").read_text()).get("fit") or []
    except (OSError, ValueError):
        fit = []
    advice = [s for item in fit if isinstance(item, dict) for s in item.get("suggestions") or []]
    if advice:
        diagnosis += "; " + "; ".join(str(a).rstrip(".") for a in advice[:3])
    return {"at_chance": True, "diagnosis": diagnosis}


def _summary(data: str, result: Any, test: dict[str, Any], bundle: Path, report: Path,
             timings: dict[str, float]) -> dict[str, Any]:
    return {
        "task": result.table.task,
        "data": data,
        "model": result.resolved.model_name,
        "image_size": result.resolved.image_size,
        "run": str(result.run_dir),
        "metrics": {"test": _headline(test), "val": {"accuracy": result.best_val_acc}},
        "epochs_run": len(result.history),
        "bundle": str(bundle),
        "report": str(report),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }


def _budgeted(data: str, out_dir: Path, budget: Any, *, epochs: int | None, seed: int,
              console: Console, guardrails: bool = True, show_progress: bool = True,
              candidates: Any = None) -> AutopilotResult:
    """Select under a budget, then ship the chosen artifact as ``out/bundle`` with its guardrails and a report."""
    from lensforge.evaluate import evaluate
    from lensforge.report import write_report
    from lensforge.select import select
    from lensforge.utils.io import replace_dir, staging_dir

    started, timings = time.perf_counter(), {}
    console.rule(f"[bold]lensforge autopilot[/] under a budget: {budget.model_dump(exclude_none=True)}")
    result = select(data, budget, out=out_dir, epochs=epochs or 15, seed=seed, console=console,
                    **({"candidates": candidates} if candidates else {}))
    timings["select"] = time.perf_counter() - started
    chosen, run_dir = result.chosen, result.chosen_run
    staging = staging_dir(out_dir / "bundle")
    shutil.copytree(chosen.bundle, staging, dirs_exist_ok=True)
    replace_dir(staging, out_dir / "bundle")
    shipped: dict[str, Any] = {}
    if guardrails:
        blocker = _guardrails_blocker(len(json.loads((run_dir / "splits.json").read_text()).get("val", [])))
        shipped = {"skipped": blocker} if blocker else _ship_guardrails(out_dir / "bundle", run_dir, console,
                                                                        timings, seed, show_progress)
    test = evaluate(out_dir / "bundle", split="test", seed=seed, run_dir=run_dir, write=False).metrics
    for candidate_run in sorted((out_dir / "candidates").iterdir()):
        write_report(candidate_run)
    shutil.copyfile(run_dir / "report.html", out_dir / "report.html")
    timings["total"] = time.perf_counter() - started
    summary = {
        "task": "classification", "data": data, "model": chosen.candidate, "variant": chosen.variant,
        "run": str(run_dir), "budget": budget.model_dump(),
        "metrics": {"test": _headline(test)},
        "latency_ms_p50": chosen.latency_ms, "size_mb": chosen.size_mb, "guardrails": shipped,
        "bundle": str(out_dir / "bundle"), "report": str(out_dir / "report.html"),
        "selection": str(out_dir / "selection.json"),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        **_chance_verdict(test, run_dir),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return AutopilotResult(out_dir, summary)


def _headline(test: dict[str, Any]) -> dict[str, Any]:
    """The test numbers summary.json keeps: those of the shipped artifact (ECE after its temperature)."""
    keys = ("accuracy", "macro_f1", "ece", "ece_uncalibrated", "temperature", "num_samples", "evaluated",
            "chance_accuracy", "at_chance")
    return {k: test[k] for k in keys if k in test}
