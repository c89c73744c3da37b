"""Measure variants the way they ship: accuracy through ONNX Runtime, latency side by side.

Latency comparisons between a variant and its parent are interleaved (round-robin
over the bundles, medians over rounds) so that drift in machine load hits all of
them alike; shared 2-core machines vary up to 2x between runs, and a guard that
compared numbers taken minutes apart would accept or reject at random.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.deploy.bundle import load_bundle
from lensforge.evaluate.metrics import classification_metrics


@dataclass
class TestSet:
    """The run's held-out images (uint8, decoded once) and their targets."""

    images: np.ndarray
    targets: np.ndarray
    class_names: list[str]

    def logits(self, bundle_path: Path, batch_size: int = 256) -> np.ndarray:
        bundle = load_bundle(bundle_path)
        return np.concatenate([bundle.predict_uint8(self.images[i:i + batch_size])[0]
                               for i in range(0, len(self.images), batch_size)])

    def accuracy(self, bundle_path: Path) -> float:
        return float((self.logits(bundle_path).argmax(1) == self.targets).mean())

    def metrics(self, bundle_path: Path) -> dict[str, Any]:
        full = classification_metrics(self.logits(bundle_path), self.targets, self.class_names)
        return {k: full[k] for k in ("accuracy", "macro_f1", "ece", "num_samples", "chance_accuracy", "at_chance")}


def load_test_set(run_dir: Path, split: str = "test") -> TestSet:
    """The run's own split of its own data, decoded with its preprocessing."""
    import json

    from lensforge.data.preprocess import Preprocess
    from lensforge.data.sources import open_source
    from lensforge.data.splits import load_splits
    from lensforge.data.table import load_table

    info = json.loads((run_dir / "run.json").read_text())
    table = load_table(open_source(info["data"]), Preprocess.from_dict(info["preprocess"]), on_bad_image="skip")
    indices = load_splits(run_dir / "splits.json", table).get(split)
    return TestSet(table.images[indices], table.targets[indices], list(info["class_names"]))


def interleaved_latency(bundles: list[Path], *, batch: int = 1, rounds: int = 7, calls: int = 20,
                        threads: int | None = None, seed: int = 0) -> list[dict[str, float]]:
    """Per bundle: p50/p90/p99 latency in ms at ``batch``, measured round-robin.

    Bundles take turns in blocks of ``calls`` runs, in an order that reverses every round,
    so slow drifts of a shared machine's load hit every bundle alike.
    """
    loaded = [load_bundle(path, intra_op_num_threads=threads) for path in bundles]
    rng = np.random.default_rng(seed)
    # random uint8 pixels, each bundle its own input size, the same array on every call; timed
    # through outputs_uint8 (any task), so a version-1 bundle pays its NumPy normalisation as it would in use
    inputs = [rng.integers(0, 256, (batch, b.preprocess.channels, *b.preprocess.input_size), dtype=np.uint8)
              for b in loaded]
    for bundle, x in zip(loaded, inputs):  # warm-up: first runs allocate and pick kernels
        for _ in range(5):
            bundle.outputs_uint8(x)
    samples: list[list[float]] = [[] for _ in loaded]
    order = list(range(len(loaded)))
    for _ in range(rounds):
        for i in order:
            bundle, x = loaded[i], inputs[i]
            for _ in range(calls):
                start = time.perf_counter_ns()
                bundle.outputs_uint8(x)
                samples[i].append((time.perf_counter_ns() - start) / 1e6)
        order.reverse()  # alternate who goes first: caches and clock ramps favour no bundle
    return [{"p50": float(np.percentile(s, 50)), "p90": float(np.percentile(s, 90)),
             "p99": float(np.percentile(s, 99)), "batch": batch} for s in samples]
