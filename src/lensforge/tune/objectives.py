"""What a trial is scored on, measured on the trial's exported ONNX bundle.

One registry entry per objective: its direction and how to measure it. Accuracy is the
bundle's accuracy on the validation split (the test split is kept for the final number);
latency is the p50 at batch 1 through ONNX Runtime, timed as ``lensforge select`` times
(:func:`lensforge.compress.measure.interleaved_latency`); size is ``model.onnx`` in MB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lensforge.errors import UsageError
from lensforge.registry import Registry

Measure = Callable[[Path], float]  # bundle folder -> value


@dataclass(frozen=True)
class Objective:
    name: str
    direction: Literal["maximize", "minimize"]
    label: str  # for tables and plot axes
    measure: Measure


OBJECTIVES: Registry[Objective] = Registry("objective", listed=False)


def _register(name: str, direction: Literal["maximize", "minimize"], label: str) -> Callable[[Measure], Measure]:
    def add(measure: Measure) -> Measure:
        OBJECTIVES.register(name)(Objective(name, direction, label, measure))
        return measure

    return add


@_register("accuracy", "maximize", "val accuracy")
def bundle_val_accuracy(bundle: Path) -> float:
    from lensforge.evaluate import evaluate

    return float(evaluate(bundle, split="val", write=False).metrics["accuracy"])


@_register("latency_ms", "minimize", "p50 latency (ms, batch 1)")
def bundle_latency_ms(bundle: Path) -> float:
    from lensforge.compress.measure import interleaved_latency

    return float(interleaved_latency([bundle])[0]["p50"])


@_register("size_mb", "minimize", "model.onnx (MB)")
def bundle_size_mb(bundle: Path) -> float:
    return (bundle / "model.onnx").stat().st_size / 1e6


def check_objectives(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Known, distinct, accuracy among them (a study on speed alone finds a model that learned nothing)."""
    names = tuple(names)
    for name in names:
        if name not in OBJECTIVES:
            raise UsageError(f"--objectives: {OBJECTIVES.unknown_message(name)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--objectives: {','.join(names)} names an objective twice")
    if "accuracy" not in names:
        raise UsageError(f"--objectives: {','.join(names) or 'nothing'} lacks accuracy "
                         "(e.g. accuracy,latency_ms)")
    return ("accuracy", *(n for n in names if n != "accuracy"))  # accuracy first: plots and tables rely on it


def objective(name: str) -> Objective:
    return OBJECTIVES.get(name)
