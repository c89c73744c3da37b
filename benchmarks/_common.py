"""Shared by the deployment benchmarks: machine header, cached training runs, interleaved timing.

Import this module before torch: it sets ``OMP_WAIT_POLICY=PASSIVE`` (unless already set),
because OpenMP threads that spin while waiting make torch up to ~20x slower when the
2 cores are shared with other jobs, which would measure the neighbours, not the model.

Timing rule for every benchmark here: the things compared are timed *interleaved*
(round-robin, ``calls`` back-to-back calls each per round, several rounds) and a ratio is
the median over rounds of the per-round ratio of medians, so that load drift on a shared
machine hits both sides of a ratio alike. ``lensforge.compress.measure.interleaved_latency``
does the same for bundles only; this helper takes any callables (torch eager too).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see the docstring

import hashlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

THREADS = 2  # every backend, every benchmark: the machine has 2 cores
DEFAULT_WORKDIR = Path("/tmp/lensforge-bench-runs")  # trained runs, reused across benchmarks
PACKAGES = ("torch", "onnxruntime", "onnx", "timm", "torch-pruning", "numpy", "openvino", "lensforge")


# ---------------------------------------------------------------------------- machine and versions


def machine() -> dict[str, Any]:
    """CPU (lensforge's own detection), cores, load average, thread settings and package versions."""
    import platform

    from lensforge.utils.hardware import detect_cpu

    cpu = detect_cpu()
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu.model_name, "logical_cores": cpu.logical_cores, "usable_cores": cpu.usable_cores,
            "physical_cores_used": cpu.peak_cores, "isa": list(cpu.isa), "clock_ghz": cpu.clock_ghz,
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()], "threads": THREADS,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "versions": versions}


def print_header(title: str, info: dict[str, Any]) -> None:
    v = info["versions"]
    shown = ", ".join(f"{k} {v[k]}" for k in ("python", *PACKAGES) if v.get(k))
    load = "/".join(f"{x:.2f}" for x in info["load_avg_1_5_15"])
    print(f"# {title}\n{info['cpu']}, {info['usable_cores']} usable of {info['logical_cores']} CPUs "
          f"({info['physical_cores_used']} physical), {'+'.join(info['isa'][-4:])}; load average {load}; "
          f"{info['threads']} threads per backend, OMP_WAIT_POLICY={info['omp_wait_policy']}\n{shown}", flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"raw results: {path}")


# ---------------------------------------------------------------------------- training runs (cached)


@dataclass(frozen=True)
class Recipe:
    """A lensforge training run: ``resolve_config`` options (threads and out are added)."""

    options: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        text = json.dumps(self.options, sort_keys=True)
        model = str(self.options.get("model", "model"))
        return f"{model}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


@dataclass
class TrainedRun:
    path: Path
    reused: bool  # found complete in the work folder, not trained by this process
    train_s: float | None
    best_val_acc: float | None
    epochs: int


def recipe(model: str, *, data: str, size: int, epochs: int, **options: Any) -> Recipe:
    """A lensforge training run (seed 0, no early stop, so every epoch budget is spent as given)."""
    return Recipe({"data": data, "model": model, "image_size": size, "epochs": epochs, "seed": 0,
                   "early_stopping": 0, **options})


def shapes_recipe(model: str, *, n: int, size: int, epochs: int, **options: Any) -> Recipe:
    """Training on ``builtin:shapes`` (n images of size px, 70/15/15 split)."""
    return recipe(model, data=f"builtin:shapes?n={n}&size={size}&seed=0", size=size, epochs=epochs, **options)


# Real held-out data for the int8 and prune benchmarks: scikit-learn's 1,797 handwritten digits
# (8x8, grey), upscaled to 32 px; 30% test split = 539 images, so one image is 0.19 points.
# Why not builtin:shapes: timm's ResNet-18 from scratch stays at chance there for hundreds of
# steps (its stride-4 stem leaves the small shapes a few pixels wide; measured on this machine:
# 19% test after 4 epochs at 64 px, 43-50% after 6 epochs of 14,000 images at 32 px, ~15 min),
# while on digits it reaches ~99.8% in 10 epochs (~2 min).
DIGITS = {"data": "builtin:digits", "test_fraction": 0.3, "batch_size": 32}
RESNET_RECIPE = recipe("resnet18", size=32, epochs=10, **DIGITS)


def trained_run(wanted: Recipe, workdir: Path, *, fresh: bool = False) -> TrainedRun:
    """Train ``wanted`` with lensforge into ``workdir/<key>``, or reuse a complete run already there.

    The folder name hashes the options, so a changed recipe trains anew; ``fresh`` retrains.
    """
    import shutil

    from rich.console import Console

    from lensforge.train import resolve_config, train

    run_dir = workdir / wanted.key()
    info_path = run_dir / "run.json"
    if not fresh and info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("status") == "complete":
            return TrainedRun(run_dir, True, (info.get("timings_s") or {}).get("train"), info.get("best_val_acc"),
                              int(info.get("epochs_run", 0)))
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = resolve_config(None, **{**wanted.options, "out": str(run_dir), "threads": THREADS})
    started = time.perf_counter()
    result = train(cfg, show_progress=False, console=Console(quiet=True))
    return TrainedRun(run_dir, False, time.perf_counter() - started, result.best_val_acc, len(result.history))


def test_accuracy_torch(run_dir: Path) -> float:
    """Top-1 on the run's test split through PyTorch eager (lensforge's evaluate)."""
    from lensforge.evaluate.runner import evaluate

    return float(evaluate(run_dir, split="test", write=False).metrics["accuracy"])


# ---------------------------------------------------------------------------- callables to time


def torch_call(model: Any, x: np.ndarray) -> Callable[[], Any]:
    """One eager fp32 forward pass at batch ``len(x)`` (inference mode, ``THREADS`` threads)."""
    import torch

    torch.set_num_threads(THREADS)
    model = model.eval()
    tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def run() -> Any:
        with torch.inference_mode():
            return model(tensor)

    return run


def ort_call(bundle_path: Path, pixels: np.ndarray) -> Callable[[], Any]:
    """One ONNX Runtime call on the bundle's model, as ``lensforge bench`` makes it (logits only).

    ``pixels``: uint8 (N, C, H, W); a bundle's model normalises them itself (format version 2).
    """
    from lensforge.deploy.bundle import load_bundle

    bundle = load_bundle(bundle_path, intra_op_num_threads=THREADS)
    session, feed = bundle.session, {bundle.input_name: bundle.model_input(pixels)}
    return lambda: session.run(["logits"], feed)[0]


# ---------------------------------------------------------------------------- interleaved timing


@dataclass
class Timings:
    """Latencies (ms) of several callables measured round-robin."""

    samples: dict[str, list[list[float]]]  # name -> rounds -> per-call ms
    load_before: float
    load_after: float

    def p50(self, name: str) -> float:
        return float(np.median([ms for rnd in self.samples[name] for ms in rnd]))

    def round_medians(self, name: str) -> list[float]:
        return [float(np.median(rnd)) for rnd in self.samples[name]]

    def ratio(self, slow: str, fast: str) -> dict[str, float]:
        """How many times faster ``fast`` is than ``slow``: median over rounds, and the rounds' range."""
        per_round = [a / b for a, b in zip(self.round_medians(slow), self.round_medians(fast))]
        return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}

    def to_dict(self) -> dict[str, Any]:
        return {"p50_ms": {n: self.p50(n) for n in self.samples},
                "round_medians_ms": {n: self.round_medians(n) for n in self.samples},
                "load_avg_1min": [self.load_before, self.load_after]}


def interleaved(calls: dict[str, Callable[[], Any]], *, rounds: int = 9, calls_per_round: int = 20,
                warmup: int = 5) -> Timings:
    """Time each callable ``calls_per_round`` times per round, round-robin, after ``warmup`` calls each."""
    load_before = load_average()
    for call in calls.values():  # first calls allocate and pick kernels
        for _ in range(warmup):
            call()
    samples: dict[str, list[list[float]]] = {name: [] for name in calls}
    for r in range(rounds):
        # alternate the order so neither side always runs right after the other's warm caches
        order = list(calls.items()) if r % 2 == 0 else list(reversed(calls.items()))
        for name, call in order:
            times = []
            for _ in range(calls_per_round):
                start = time.perf_counter_ns()
                call()
                times.append((time.perf_counter_ns() - start) / 1e6)
            samples[name].append(times)
    return Timings(samples, load_before, load_average())


def fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"
