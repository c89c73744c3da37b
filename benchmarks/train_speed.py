"""Time to a target validation accuracy: lensforge's default recipe vs a plain recipe.

Same model (``tinycnn_s``), same data (``builtin:shapes``, 32 px), same seed and split,
run one after another in one process, reported as a ratio (DAWNBench-style
time-to-accuracy):

- **plain**: AdamW at a constant learning rate and nothing else (no warm-up, schedule,
  label smoothing, augmentation, weight decay or clipping), up to ``--cap`` epochs with
  validation every epoch; its time-to-target is the time until val accuracy first
  reaches ``--target``.
- **default**: lensforge's defaults. Its one-cycle schedule depends on the epoch
  budget, so it runs a ladder of budgets (cheapest first, stopping at the first that
  reaches the target); its time-to-target is that run's time until val accuracy first
  reaches the target.
- **ablations** (``--ablate``): the default recipe with one ingredient switched off at
  a time, at the same budget as the cheapest default run, to see which ingredient
  matters.

Time of an epoch = training (``epoch_time_s``) + that run's mean per-epoch overhead
(validation, checkpoint), the same accounting for every recipe. Because the 2-core
machine is shared, wall times swing with other people's load; the epochs-to-target
ratio is printed next to the time ratio, as the load-independent figure.

    .venv/bin/python benchmarks/train_speed.py            # the full benchmark (~15 min)
    .venv/bin/python benchmarks/train_speed.py --quick    # a ~1-minute smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PLAIN = {"optimizer": "adamw", "schedule": "constant", "warmup_epochs": 0, "label_smoothing": 0.0,
         "augment": "none", "weight_decay": 0.0, "clip_grad_norm": 0.0, "early_stopping": 0}
DEFAULT: dict[str, Any] = {"early_stopping": 0}  # lensforge defaults; no early stop so runs compare
# One ingredient of the default recipe off at a time (the rest stays default).
ABLATIONS: dict[str, dict[str, Any]] = {
    "default -schedule": {"schedule": "constant", "warmup_epochs": 0},
    "default -label smoothing": {"label_smoothing": 0.0},
    "default -augment": {"augment": "none"},
    "default -weight decay": {"weight_decay": 0.0},
    "default -clipping": {"clip_grad_norm": 0.0},
}


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    import timm

    import lensforge

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "lensforge": lensforge.__version__}


def load_average() -> float:
    return os.getloadavg()[0]  # 1-minute


def train_run(name: str, out: Path, *, data: str, epochs: int, seed: int, threads: int,
              overrides: dict[str, Any]) -> dict[str, Any]:
    """One training run; returns its per-epoch curve (val acc, cumulative seconds) and test accuracy."""
    from rich.console import Console

    from lensforge.evaluate.runner import evaluate
    from lensforge.train import resolve_config, train

    run_dir = out / f"{name.replace(' ', '_')}_e{epochs}_s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = resolve_config(None, data=data, model="tinycnn_s", out=str(run_dir), epochs=epochs, seed=seed,
                         threads=threads, **overrides)
    load_before = load_average()
    result = train(cfg, show_progress=False, console=Console(quiet=True))
    train_s = [row["epoch_time_s"] for row in result.history]
    # validation + checkpoint + metrics writing, spread evenly over the epochs
    overhead_s = max(0.0, result.timings_s["train"] - sum(train_s)) / len(train_s)
    cumulative, total = [], 0.0
    for seconds in train_s:
        total += seconds + overhead_s
        cumulative.append(total)
    test = evaluate(run_dir, split="test", write=False).metrics
    return {"name": name, "epochs": epochs, "seed": seed, "lr": result.resolved.lr,
            "val_acc": [row["val_acc"] for row in result.history], "epoch_train_s": train_s,
            "overhead_per_epoch_s": overhead_s, "cumulative_s": cumulative,
            "best_val_acc": result.best_val_acc, "test_acc": test["accuracy"],
            "load_avg_1min": [load_before, load_average()]}


def first_hit(run: dict[str, Any], target: float) -> tuple[int, float] | None:
    """(epochs, seconds) until val accuracy first reaches ``target``, or None."""
    for epoch, (acc, seconds) in enumerate(zip(run["val_acc"], run["cumulative_s"]), start=1):
        if acc >= target:
            return epoch, seconds
    return None


def run_ladder(name: str, out: Path, ladder: list[int], target: float, overrides: dict[str, Any],
               **common: Any) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Budgets cheapest first; stop at the first whose run reaches the target."""
    runs = []
    for epochs in ladder:
        run = train_run(name, out, epochs=epochs, overrides=overrides, **common)
        runs.append(run)
        report_run(run, target)
        if first_hit(run, target):
            break
    return runs, runs[-1]  # the cheapest run that reached the target, else the biggest budget


def report_run(run: dict[str, Any], target: float) -> None:
    hit = first_hit(run, target)
    curve = " ".join(f"{a:.3f}" for a in run["val_acc"])
    where = f"hit at epoch {hit[0]} ({hit[1]:.0f} s)" if hit else "target not reached"
    print(f"  {run['name']:<26} seed {run['seed']} lr {run['lr']:.0e} {run['epochs']:>2} ep: "
          f"{where}; test {run['test_acc']:.4f}; val {curve}; "
          f"epoch {statistics.median(run['epoch_train_s']):.1f}+{run['overhead_per_epoch_s']:.1f} s; "
          f"load {run['load_avg_1min'][0]:.1f}->{run['load_avg_1min'][1]:.1f}", flush=True)


def summary_row(label: str, run: dict[str, Any], target: float) -> dict[str, Any]:
    hit = first_hit(run, target)
    return {"recipe": label, "budget_epochs": run["epochs"],
            "epochs_to_target": hit[0] if hit else None, "seconds_to_target": hit[1] if hit else None,
            "test_acc": run["test_acc"], "best_val_acc": run["best_val_acc"],
            "s_per_epoch": statistics.median(run["epoch_train_s"]) + run["overhead_per_epoch_s"]}


def one_seed(args: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    common = {"data": args.data, "seed": seed, "threads": args.threads}
    target = args.target
    rows, runs = [], []
    print(f"seed {seed}", flush=True)
    ladder_runs, default_run = run_ladder("default", out, args.ladder, target, DEFAULT, **common)
    runs += ladder_runs
    rows.append(summary_row("default", default_run, target))
    budget = default_run["epochs"]
    for lr in args.plain_lrs:
        run = train_run(f"plain lr={lr:g}", out, epochs=args.cap, overrides={**PLAIN, "lr": lr}, **common)
        report_run(run, target)
        runs.append(run)
        rows.append(summary_row(f"plain, AdamW lr={lr:g}", run, target))
    if args.ablate:
        for name, change in ABLATIONS.items():
            run = train_run(name, out, epochs=budget, overrides={**DEFAULT, **change}, **common)
            report_run(run, target)
            runs.append(run)
            rows.append(summary_row(name, run, target))
    return {"seed": seed, "rows": rows, "runs": runs}


def median_or_none(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def combine(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over seeds of each recipe's row (a recipe that missed the target in a seed counts as missing)."""
    table = []
    for i, first in enumerate(per_seed[0]["rows"]):
        rows = [s["rows"][i] for s in per_seed]
        merged = {"recipe": first["recipe"], "reached": f"{sum(r['epochs_to_target'] is not None for r in rows)}"
                                                         f"/{len(rows)}"}
        for key in ("budget_epochs", "epochs_to_target", "seconds_to_target", "s_per_epoch", "test_acc",
                    "best_val_acc"):
            merged[key] = median_or_none([r[key] for r in rows])
        table.append(merged)
    return table


def ratios(per_seed: list[dict[str, Any]], plain_label: str) -> dict[str, Any]:
    """Per seed: plain / default, in seconds and in epochs; then medians."""
    by_time, by_epochs = [], []
    for s in per_seed:
        rows = {r["recipe"]: r for r in s["rows"]}
        default, plain = rows["default"], rows[plain_label]
        if default["seconds_to_target"] and plain["seconds_to_target"]:
            by_time.append(plain["seconds_to_target"] / default["seconds_to_target"])
            by_epochs.append(plain["epochs_to_target"] / default["epochs_to_target"])
    return {"time_ratio_per_seed": by_time, "epoch_ratio_per_seed": by_epochs,
            "time_ratio": median_or_none(by_time), "epoch_ratio": median_or_none(by_epochs)}


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(table: list[dict[str, Any]], target: float) -> None:
    print(f"\ntime to {target:.1%} val accuracy (medians over seeds)")
    print(f"| {'recipe':<28} | reached | budget ep | epochs to target | s to target | s/epoch | test acc |")
    print(f"|{'-' * 30}|---------|-----------|------------------|-------------|---------|----------|")
    for r in table:
        print(f"| {r['recipe']:<28} | {r['reached']:>7} | {fmt(r['budget_epochs'], 'g'):>9} | "
              f"{fmt(r['epochs_to_target'], 'g'):>16} | {fmt(r['seconds_to_target'], '.0f'):>11} | "
              f"{fmt(r['s_per_epoch'], '.1f'):>7} | {fmt(r['test_acc'], '.4f'):>8} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke run (small data, low target)")
    parser.add_argument("--json", type=Path, help="write raw results (every run's curve) here")
    parser.add_argument("--n", type=int, default=12_000, help="images generated (70/15/15 split)")
    parser.add_argument("--target", type=float, default=0.99, help="validation accuracy to reach")
    parser.add_argument("--ladder", default="2,3,4,6", help="default recipe's epoch budgets, cheapest first")
    parser.add_argument("--cap", type=int, default=10, help="plain recipe's epoch cap")
    parser.add_argument("--plain-lrs", default="1e-3", help="plain recipe's learning rates, comma-separated")
    parser.add_argument("--seeds", default="0,1", help="seeds (model init, shuffling, split), comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a loaded box)")
    parser.add_argument("--ablate", action="store_true", help="also run the default minus one ingredient")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.target, args.ladder, args.cap, args.seeds = 4000, 0.5, "3", 4, "0"
    args.ladder = [int(e) for e in args.ladder.split(",")]
    args.plain_lrs = [float(lr) for lr in args.plain_lrs.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.data = f"builtin:shapes?n={args.n}&size=32&seed=0"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores; python {info['python']}, torch {info['torch']}, "
          f"timm {info['timm']}, lensforge {info['lensforge']}; {args.threads} torch threads; "
          f"load average {load_average():.2f}")
    print(f"data {args.data}; target val acc {args.target:.1%}; default ladder {args.ladder}; "
          f"plain cap {args.cap} epochs", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lensforge-train-speed-") as tmp:
        out = args.keep or Path(tmp)
        per_seed = [one_seed(args, seed, out) for seed in args.seeds]
    table = combine(per_seed)
    print_table(table, args.target)
    summary = {"plain": {}}
    for lr in args.plain_lrs:
        label = f"plain, AdamW lr={lr:g}"
        summary["plain"][label] = r = ratios(per_seed, label)
        print(f"{label} / default: time-to-target ratio {fmt(r['time_ratio'], '.2f')}x "
              f"(per seed {', '.join(f'{x:.2f}' for x in r['time_ratio_per_seed'])}); "
              f"epochs-to-target ratio {fmt(r['epoch_ratio'], '.2f')}x "
              f"(per seed {', '.join(f'{x:.2f}' for x in r['epoch_ratio_per_seed'])})")
    wall = time.perf_counter() - started
    print(f"benchmark wall time {wall:.0f} s; load average now {load_average():.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "table": table, "ratios": summary, "per_seed": per_seed,
                                         "wall_s": wall}, indent=1))


if __name__ == "__main__":
    main()
