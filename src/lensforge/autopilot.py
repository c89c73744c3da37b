"""``autopilot()``: the main job — data to evaluated bundle and report, with good defaults.

Split, choose a model suited to the data and image size, train, export the
ONNX bundle, evaluate the *bundle* on the test split (the number that ships),
write the report, and ``summary.json``. Later issues add budgets, compression,
stress tests and guardrails as further steps of the same chain.
"""

from __future__ import annotations

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
              show_progress: bool = True, **train_overrides: Any) -> AutopilotResult:
    """Run the whole chain on ``data`` (default ``builtin:digits``) into ``out`` (never overwritten)."""
    from lensforge.deploy.export import write_bundle
    from lensforge.evaluate import evaluate
    from lensforge.report import write_report
    from lensforge.train import resolve_config, train

    console = console or Console(stderr=True)
    out_dir = Path(out) if out is not None else fresh_dir("runs", "autopilot")
    if out is not None and (out_dir / "summary.json").exists():
        out_dir = fresh_dir(out_dir.parent, out_dir.name)
    started, timings = time.perf_counter(), {}
    cfg = resolve_config(None, data=data or DEFAULT_DATA, model=model, out=str(out_dir),
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

    step = time.perf_counter()
    report = write_report(out_dir)
    timings["report"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started
    summary = _summary(cfg.data, result, test, bundle_dir, report, timings)
    atomic_write_json(out_dir / "summary.json", summary)
    return AutopilotResult(out_dir, summary)


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
