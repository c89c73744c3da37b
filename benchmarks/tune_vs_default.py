"""Tuned vs default: test accuracy of `lensforge tune`'s best configuration against `lensforge train`'s defaults.

Both train on the same data with the same seed (so the same split) and the same number of
epochs, and both are scored the same way: the exported ONNX bundle on the test split, which
the study never looks at (its trials are ranked on validation). They run one after the other
in one process on this machine; the tune gets ``--trials`` trials or ``--timeout`` seconds,
whichever ends first. Because one seed on a few hundred test images is a noisy measurement
(and the study picked its best on one seed), both configurations are then trained again
with ``--extra-seeds`` other seeds on the same split (``splits_file``), and the medians over
seeds are compared as well.

    python benchmarks/tune_vs_default.py                      # shapes n=2000 @ 32 px, 15 epochs, <= 20 trials
    python benchmarks/tune_vs_default.py --trials 4 --epochs 2 --extra-seeds 1 --data builtin:digits  # a quick look
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import _common  # first lensforge-side import: sets OMP_WAIT_POLICY before torch loads  # isort: skip

DATA = "builtin:shapes?n=2000&size=32"
EPOCHS = 15  # shapes at n=2000: ~165 steps, where the default recipe reaches the 90s (6 epochs stay near chance)
TRIALS = 20
TIMEOUT_S = 420  # keeps the whole benchmark around 10 minutes on 2 cores
EXTRA_SEEDS = 2


def train_and_test(options: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train with ``resolve_config`` options, export, and score the bundle on the test split."""
    from lensforge.deploy.from_run import export_run
    from lensforge.evaluate import evaluate
    from lensforge.train import resolve_config, train

    started = time.perf_counter()
    result = train(resolve_config(None, **options, out=str(out)), show_progress=False)
    test = evaluate(export_run(out), split="test").metrics
    return {"seed": options["seed"], "model": result.resolved.model_name, "image_size": result.resolved.image_size,
            "val_accuracy": result.best_val_acc, "test_accuracy": test["accuracy"], "test_images": test["num_samples"],
            "wall_s": round(time.perf_counter() - started, 1)}


def tuned_run(data: str, epochs: int, seed: int, trials: int, timeout_s: float, out: Path) -> dict[str, Any]:
    from lensforge.tune import tune

    started = time.perf_counter()
    result = tune(data, trials=trials, timeout_s=timeout_s, epochs=epochs, seed=seed, out=str(out))
    best = result.summary["best"]
    return {"best_trial": best["trial"], "params": best["params"], "val_accuracy": best["values"]["accuracy"],
            "test_accuracy": best["test"]["accuracy"], "test_images": best["test"]["num_samples"],
            "counts": result.summary["counts"], "wall_s": round(time.perf_counter() - started, 1),
            "best_yaml": str(result.best_config)}


def other_seeds(options: dict[str, Any], seeds: list[int], splits: Path, workdir: Path) -> list[dict[str, Any]]:
    return [train_and_test({**options, "seed": s, "splits_file": str(splits)}, workdir / f"seed{s}") for s in seeds]


def standard_error(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--trials", type=int, default=TRIALS)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds after which no trial starts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-seeds", type=int, default=EXTRA_SEEDS, help="retrain both configs with more seeds")
    parser.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR / "tune_vs_default")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = parser.parse_args()

    from lensforge.train.config import load_config_file

    info = _common.machine()
    info["versions"]["optuna"] = metadata.version("optuna")
    _common.print_header("tuned vs default training config (test accuracy through the ONNX bundle)", info)
    print(f"optuna {info['versions']['optuna']}; data {args.data}, {args.epochs} epochs, seed {args.seed}, "
          f"<= {args.trials} trials or {args.timeout:g} s; then {args.extra_seeds} more seeds each", flush=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    default_options = {"data": args.data, "epochs": args.epochs, "seed": args.seed}
    default = train_and_test(default_options, args.workdir / "default")
    tuned = tuned_run(args.data, args.epochs, args.seed, args.trials, args.timeout, args.workdir / "tune")

    print("\n| config | val acc | test acc (± s.e.) | wall |\n|---|---|---|---|")
    for name, row in (("default (`lensforge train`)", default), ("tuned (`lensforge tune`, best)", tuned)):
        se = standard_error(row["test_accuracy"], row["test_images"])
        print(f"| {name} | {row['val_accuracy']:.1%} | {row['test_accuracy']:.1%} (± {se:.1%}) "
              f"| {row['wall_s']:.0f} s |")
    counts = tuned["counts"]
    gain = 100 * (tuned["test_accuracy"] - default["test_accuracy"])
    print(f"\ndefault: {default['model']} @ {default['image_size']} px; tuned best: trial {tuned['best_trial']}, "
          f"{tuned['params']}")
    print(f"trials: {sum(counts.values())} ({counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} pruned, "
          f"{counts.get('FAIL', 0)} failed); test gain {gain:+.1f} points; load average now {_common.load_average()}",
          flush=True)

    seeds = [args.seed + i for i in range(1, args.extra_seeds + 1)]
    splits = args.workdir / "default" / "splits.json"
    tuned_options = {k: v for k, v in load_config_file(tuned["best_yaml"]).items() if k not in ("seed", "splits_file")}
    per_seed = {"default": [default, *other_seeds(default_options, seeds, splits, args.workdir / "default-seeds")],
                "tuned": [{**tuned, "seed": args.seed},
                          *other_seeds(tuned_options, seeds, splits, args.workdir / "tuned-seeds")]}
    print("\n| seed | default test acc | tuned test acc | gain (points) |\n|---|---|---|---|")
    for d, t in zip(per_seed["default"], per_seed["tuned"]):
        print(f"| {d['seed']} | {d['test_accuracy']:.1%} | {t['test_accuracy']:.1%} "
              f"| {100 * (t['test_accuracy'] - d['test_accuracy']):+.1f} |")
    medians = {k: statistics.median(r["test_accuracy"] for r in rows) for k, rows in per_seed.items()}
    print(f"| median | {medians['default']:.1%} | {medians['tuned']:.1%} "
          f"| {100 * (medians['tuned'] - medians['default']):+.1f} |")
    print(f"load average now {_common.load_average()}")
    _common.write_json(args.json, {"machine": info, "settings": vars(args), "default": default, "tuned": tuned,
                                   "per_seed": per_seed})


if __name__ == "__main__":
    main()
