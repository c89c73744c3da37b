"""``autopilot()``: the main job — data to evaluated bundle and report, with good defaults.

Split, choose a model suited to the data and image size, train, export the
ONNX bundle, evaluate the *bundle* on the test split (the number that ships),
calibrate it (temperature scaling), fit its guardrails (OOD detector, input-quality
reference, abstain threshold: they ship inside the bundle), run the quick corruption
suite on it, write the report, and ``summary.json``. With a budget, candidates are
trained and compressed first and the chosen artifact is shipped.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from lensforge.utils.io import atomic_write_json, fresh_dir

DEFAULT_DATA = "builtin:digits"
DEFAULT_EPOCHS = 30  # with early stopping; TinyCNN on digits converges in ~20


@dataclass
class AutopilotResult:
    """Where everything went, and the headline numbers."""

    out: Path
    summary: dict[str, Any]


def autopilot(data: str | None = None, out: str | Path | None = None, *, model: str = "auto",
              epochs: int | None = None, seed: int = 0, console: Console | None = None,
              show_progress: bool = True, budget: Any = None, guardrails: bool = True,
              **train_overrides: Any) -> AutopilotResult:
    """Run the whole chain on ``data`` (default ``builtin:digits``) into ``out`` (never overwritten).

    With a :class:`lensforge.select.Budget`, candidates are trained, compressed and measured, and
    the best artifact that fits is shipped (see :func:`lensforge.select.select`).
    """
    console = console or Console(stderr=True)
    out_dir = Path(out) if out is not None else fresh_dir("runs", "autopilot")
    if out is not None and (out_dir / "summary.json").exists():
        out_dir = fresh_dir(out_dir.parent, out_dir.name)
    if budget is not None:
        return _budgeted(data or DEFAULT_DATA, out_dir, budget, epochs=epochs, seed=seed, console=console,
                         guardrails=guardrails, candidates=train_overrides.pop("candidates", None))
    return _single(data or DEFAULT_DATA, out_dir, model=model, epochs=epochs, seed=seed, console=console,
                   show_progress=show_progress, guardrails=guardrails, **train_overrides)


def _single(data: str, out_dir: Path, *, model: str, epochs: int | None, seed: int, console: Console,
            show_progress: bool, guardrails: bool = True, **train_overrides: Any) -> AutopilotResult:
    from lensforge.deploy.export import write_bundle
    from lensforge.evaluate import evaluate
    from lensforge.report import write_report
    from lensforge.train import resolve_config, train

    started, timings = time.perf_counter(), {}
    cfg = resolve_config(None, data=data, model=model, out=str(out_dir),
                         epochs=epochs or DEFAULT_EPOCHS, seed=seed, **train_overrides)
    console.rule(f"[bold]lensforge autopilot[/]: {cfg.data} -> {out_dir}")
    result = train(cfg, console=console, show_progress=show_progress)
    timings.update({f"train_{k}" if k != "train" else k: v for k, v in result.timings_s.items()})

    step = time.perf_counter()
    console.print("exporting the ONNX bundle and checking parity with PyTorch ...")
    val = result.splits.val if len(result.splits.val) else result.splits.train
    bundle_dir = write_bundle(result.model.cpu(), result.table.preprocess, result.table.class_names,
                              out_dir / "bundle", model_name=result.resolved.model_name,
                              sample_images=result.table.images[val[:64]], task=result.table.task)
    timings["export"] = time.perf_counter() - step

    step = time.perf_counter()
    console.print("evaluating the bundle (ONNX Runtime) on the test split ...")
    test = evaluate(bundle_dir, split="test", seed=seed).metrics
    timings["evaluate"] = time.perf_counter() - step

    shipped = _guardrails(bundle_dir, console, timings, seed, show_progress) if guardrails else {}
    step = time.perf_counter()
    report = write_report(out_dir)
    timings["report"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started
    summary = {**_summary(cfg.data, result, test, bundle_dir, report, timings), "guardrails": shipped}
    atomic_write_json(out_dir / "summary.json", summary)
    return AutopilotResult(out_dir, summary)


def _guardrails(bundle_dir: Path, console: Console, timings: dict[str, float], seed: int,
                show_progress: bool) -> dict[str, Any]:
    """Calibrate the bundle, fit its OOD/quality/abstain guardrails, and stress it (quick suite)."""
    from lensforge.stress.calibration import calibrate
    from lensforge.stress.ood import fit_guardrails
    from lensforge.stress.suite import StressConfig, stress

    step = time.perf_counter()
    console.print("calibrating the bundle (temperature scaling on the validation split) ...")
    calibration = calibrate(bundle_dir, seed=seed)
    console.print("fitting guardrails: OOD detectors, input-quality reference, abstain threshold ...")
    ood = fit_guardrails(bundle_dir, seed=seed)
    timings["guardrails"] = time.perf_counter() - step
    step = time.perf_counter()
    console.print("stress-testing the bundle: quick corruption suite and prediction stability ...")
    suite = stress(bundle_dir, cfg=StressConfig(suite="quick", max_images=1000, seed=seed), compare=[],
                   show_progress=show_progress).summary
    timings["stress"] = time.perf_counter() - step
    held_out = calibration.summary.get("test", calibration.summary["val"])
    return {"temperature": calibration.temperature, "ece_before": held_out["before"]["ece"],
            "ece_after": held_out["after"]["ece"], "ood_detector": ood["chosen"], "ood_threshold": ood["threshold"],
            "mean_corruption_error": suite["mean_corruption_error"],
            "translate_flip_rate": suite.get("stability", {}).get("target", {}).get("translate_flip_rate")}


def _summary(data: str, result: Any, test: dict[str, Any], bundle: Path, report: Path,
             timings: dict[str, float]) -> dict[str, Any]:
    return {
        "task": result.table.task,
        "data": data,
        "model": result.resolved.model_name,
        "image_size": result.resolved.image_size,
        "run": str(result.run_dir),
        "metrics": {"test": {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "ece": test["ece"],
                             "num_samples": test["num_samples"], "evaluated": test["evaluated"]},
                    "val": {"accuracy": result.best_val_acc}},
        "bundle": str(bundle),
        "report": str(report),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }


def _budgeted(data: str, out_dir: Path, budget: Any, *, epochs: int | None, seed: int,
              console: Console, guardrails: bool = True, candidates: Any = None) -> AutopilotResult:
    """Select under a budget, then ship the chosen artifact as ``out/bundle`` with a report."""
    from lensforge.compress.measure import load_test_set
    from lensforge.report import write_report
    from lensforge.select import select
    from lensforge.utils.io import replace_dir, staging_dir

    started = time.perf_counter()
    console.rule(f"[bold]lensforge autopilot[/] under a budget: {budget.model_dump(exclude_none=True)}")
    result = select(data, budget, out=out_dir, epochs=epochs or 15, seed=seed, console=console,
                    **({"candidates": candidates} if candidates else {}))
    chosen, run_dir = result.chosen, result.chosen_run
    test = load_test_set(run_dir).metrics(Path(chosen.bundle))
    staging = staging_dir(out_dir / "bundle")
    shutil.copytree(chosen.bundle, staging, dirs_exist_ok=True)
    replace_dir(staging, out_dir / "bundle")
    shipped = _shipped_guardrails(out_dir / "bundle", run_dir, seed, console) if guardrails else {}
    for candidate_run in sorted((out_dir / "candidates").iterdir()):
        write_report(candidate_run)
    shutil.copyfile(run_dir / "report.html", out_dir / "report.html")
    summary = {
        "task": "classification", "data": data, "model": chosen.candidate, "variant": chosen.variant,
        "run": str(run_dir), "budget": budget.model_dump(),
        "metrics": {"test": {**test, "evaluated": "bundle"}},
        "latency_ms_p50": chosen.latency_ms, "size_mb": chosen.size_mb, "guardrails": shipped,
        "bundle": str(out_dir / "bundle"), "report": str(out_dir / "report.html"),
        "selection": str(out_dir / "selection.json"),
        "timings_s": {"total": round(time.perf_counter() - started, 2)},
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return AutopilotResult(out_dir, summary)


def _shipped_guardrails(bundle: Path, run_dir: Path, seed: int, console: Console) -> dict[str, Any]:
    """Calibrate the shipped artifact and fit its own guardrails (on its own outputs: int8 differs from fp32)."""
    from lensforge.stress.calibration import calibrate
    from lensforge.stress.ood import fit_guardrails

    console.print("calibrating the shipped artifact and fitting its guardrails ...")
    calibration = calibrate(bundle, seed=seed, run_dir=run_dir)
    ood = fit_guardrails(bundle, run_dir=run_dir, seed=seed)
    held_out = calibration.summary.get("test", calibration.summary["val"])
    return {"temperature": calibration.temperature, "ece_before": held_out["before"]["ece"],
            "ece_after": held_out["after"]["ece"], "ood_detector": ood["chosen"], "ood_threshold": ood["threshold"]}
