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
(validation, checkpoint), the same accounting for every recipe. The 2-core machine is
shared and the runs are minutes apart, so load drift skews the raw time ratio; two
load-proof figures are printed next to it: the epochs-to-target ratio, and the
*load-adjusted* time ratio = epochs ratio x the per-image training-cost ratio of the
recipes, timed interleaved (a few steps of each recipe in turn, several rounds).

``--variant NAME:key=value,...`` adds the default recipe with some options changed (on
the same ladder); ``--batch-size`` sets the batch size of every recipe.

    .venv/bin/python benchmarks/train_speed.py            # the benchmark (~20 min at load 2-4)
    .venv/bin/python benchmarks/train_speed.py --quick    # a ~1-minute smoke run
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin, as the lensforge CLI and tests arrange: on a shared
# 2-core machine spinning threads make training many times slower and the timings measure the
# neighbours. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

PLAIN = {"optimizer": "adamw", "schedule": "constant", "warmup_epochs": 0, "label_smoothing": 0.0,
         "augment": "none", "weight_decay": 0.0, "clip_grad_norm": 0.0, "early_stopping": 0}
DEFAULT: dict[str, Any] = {"early_stopping": 0}  # lensforge defaults; no early stop so runs compare
COST_PROBE_STEPS = 12  # training steps per recipe and round when timing the per-image cost interleaved
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
            "torch": torch.__version__, "timm": timm.__version__, "lensforge": lensforge.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


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
    cumulative, elapsed = [], 0.0
    for seconds in train_s:
        elapsed += seconds + overhead_s
        cumulative.append(elapsed)
    test = evaluate(run_dir, split="test", write=False).metrics
    return {"name": name, "epochs": epochs, "seed": seed, "lr": result.resolved.lr,
            "batch_size": result.resolved.batch_size,
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


@dataclass(frozen=True)
class Recipe:
    """A recipe and how its epoch budget is chosen: a ladder (cheapest first), a cap, or the default's budget."""

    label: str
    overrides: dict[str, Any]
    budget: str  # "ladder" | "cap" | "default's"


def recipes(args: argparse.Namespace) -> list[Recipe]:
    shared = {"batch_size": args.batch_size} if args.batch_size else {}  # --batch-size applies to every recipe
    found = [Recipe("default", {**DEFAULT, **shared}, "ladder")]
    found += [Recipe(name, {**DEFAULT, **shared, **change}, "ladder") for name, change in args.variants.items()]
    found += [Recipe(f"plain, AdamW lr={lr:g}", {**PLAIN, **shared, "lr": lr}, "cap") for lr in args.plain_lrs]
    if args.ablate:
        found += [Recipe(name, {**DEFAULT, **shared, **change}, "default's") for name, change in ABLATIONS.items()]
    return found


def run_recipe(recipe: Recipe, args: argparse.Namespace, default_budget: int | None, out: Path,
               **common: Any) -> list[dict[str, Any]]:
    """Ladder: budgets cheapest first, stopping at the first run that reaches the target."""
    budgets = {"ladder": args.ladder, "cap": [args.cap], "default's": [default_budget or args.ladder[-1]]}
    runs = []
    for epochs in budgets[recipe.budget]:
        run = train_run(recipe.label, out, epochs=epochs, overrides=recipe.overrides, **common)
        runs.append(run)
        report_run(run, args.target)
        if first_hit(run, args.target):
            break
    return runs


def report_run(run: dict[str, Any], target: float) -> None:
    hit = first_hit(run, target)
    curve = " ".join(f"{a:.3f}" for a in run["val_acc"])
    where = f"hit at epoch {hit[0]} ({hit[1]:.0f} s)" if hit else "target not reached"
    print(f"  {run['name']:<26} seed {run['seed']} bs {run['batch_size']} lr {run['lr']:.3g} {run['epochs']:>2} ep: "
          f"{where}; test {run['test_acc']:.4f}; val {curve}; "
          f"epoch {statistics.median(run['epoch_train_s']):.1f}+{run['overhead_per_epoch_s']:.1f} s; "
          f"load {run['load_avg_1min'][0]:.1f}->{run['load_avg_1min'][1]:.1f}", flush=True)


def image_costs(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Training seconds per image of each recipe, timed interleaved (round-robin, median over rounds).

    Load on a shared machine drifts between the long runs of the ladder; timing a few steps of every
    recipe in turn, several rounds, gives a per-epoch cost ratio that the drift hits alike. The cost of
    a step does not depend on the data set's size, so a small one keeps this quick.
    """
    from rich.console import Console

    from lensforge.train import resolve_config, train

    probe_data = f"builtin:shapes?n=3000&size={args.size}&seed=0"
    timed = [r for r in recipes(args) if r.budget != "default's"]
    samples: dict[str, list[float]] = {r.label: [] for r in timed}
    for round_ in range(args.cost_rounds):
        for i, recipe in enumerate(timed):
            run_dir = out / f"cost_probe_{i}_{round_}"
            cfg = resolve_config(None, data=probe_data, model="tinycnn_s", out=str(run_dir), epochs=1, seed=0,
                                 threads=args.threads, max_train_batches=COST_PROBE_STEPS, **recipe.overrides)
            row = train(cfg, show_progress=False, console=Console(quiet=True)).history[0]
            samples[recipe.label].append(1 / row["images_per_s"])
            shutil.rmtree(run_dir, ignore_errors=True)
    return {label: statistics.median(values) for label, values in samples.items()}


def one_seed(args: argparse.Namespace, seed: int, out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every recipe's runs for one seed, by recipe label."""
    print(f"seed {seed}", flush=True)
    common = {"data": args.data, "seed": seed, "threads": args.threads}
    runs: dict[str, list[dict[str, Any]]] = {}
    default_budget = None
    for recipe in recipes(args):
        runs[recipe.label] = run_recipe(recipe, args, default_budget, out, **common)
        if recipe.label == "default" and first_hit(runs["default"][-1], args.target):
            default_budget = runs["default"][-1]["epochs"]
    return runs


def row(label: str, runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The cheapest run that reaches ``target`` (else the last one) and its time to it."""
    run = next((r for r in runs if first_hit(r, target)), runs[-1])
    hit = first_hit(run, target)
    return {"recipe": label, "budget_epochs": run["epochs"],
            "epochs_to_target": hit[0] if hit else None, "seconds_to_target": hit[1] if hit else None,
            "final_val_acc": run["val_acc"][-1], "test_acc": run["test_acc"],
            "s_per_epoch": statistics.median(run["epoch_train_s"]) + run["overhead_per_epoch_s"]}


def median_or_none(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def total(run: dict[str, Any], unit: str) -> float:
    return run["cumulative_s"][-1] if unit == "seconds" else run["epochs"]


def summarise(per_seed: list[dict[str, list[dict[str, Any]]]], target: float, baseline: str,
              costs: dict[str, float]) -> list[dict[str, Any]]:
    """Per recipe: medians over seeds, and ``baseline``/recipe time and epoch ratios (per seed, then median).

    Where the baseline misses the target within its cap, its whole run stands in and the ratio is a
    lower bound (flagged).
    """
    table = []
    for label in per_seed[0]:
        rows = [row(label, seed_runs[label], target) for seed_runs in per_seed]
        merged: dict[str, Any] = {"recipe": label, "reached": sum(r["epochs_to_target"] is not None for r in rows),
                                  "seeds": len(rows)}
        for key in ("budget_epochs", "epochs_to_target", "seconds_to_target", "s_per_epoch", "final_val_acc",
                    "test_acc"):
            merged[key] = median_or_none([r[key] for r in rows])
        for unit in ("seconds", "epochs"):
            per, lower_bound = [], False
            for seed_runs, r in zip(per_seed, rows):
                base = row(baseline, seed_runs[baseline], target)
                if r[f"{unit}_to_target"] is None:
                    continue
                if base[f"{unit}_to_target"] is None:
                    lower_bound = True
                    per.append(total(seed_runs[baseline][-1], unit) / r[f"{unit}_to_target"])
                else:
                    per.append(base[f"{unit}_to_target"] / r[f"{unit}_to_target"])
            merged[f"{unit}_ratio_per_seed"] = per
            merged[f"{unit}_ratio"] = median_or_none(per) if len(per) == len(rows) else None
            merged[f"{unit}_ratio_is_lower_bound"] = lower_bound
        # epochs ratio x per-image cost ratio timed interleaved: a time ratio that load drift cannot skew
        cost_ratio = costs[baseline] / costs[label] if label in costs else None
        merged["adjusted_ratio"] = (merged["epochs_ratio"] * cost_ratio
                                    if merged["epochs_ratio"] is not None and cost_ratio else None)
        merged["adjusted_ratio_is_lower_bound"] = merged["epochs_ratio_is_lower_bound"]
        table.append(merged)
    return table


def fmt_ratio(r: dict[str, Any], unit: str) -> str:
    value = fmt(r[f"{unit}_ratio"], ".2f")
    return f">={value}" if r[f"{unit}_ratio_is_lower_bound"] and value != "-" else value


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(table: list[dict[str, Any]], target: float, baseline: str) -> None:
    print(f"\ntime to {target:.1%} val accuracy (medians over seeds; ratio = {baseline} / recipe)")
    print("| recipe | reached | budget ep | epochs to target | s to target | s/epoch | final val acc | test acc "
          "| time ratio | epoch ratio | load-adjusted time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['recipe']} | {r['reached']}/{r['seeds']} | {fmt(r['budget_epochs'], 'g')} | "
              f"{fmt(r['epochs_to_target'], 'g')} | {fmt(r['seconds_to_target'], '.0f')} | "
              f"{fmt(r['s_per_epoch'], '.1f')} | {fmt(r['final_val_acc'], '.4f')} | {fmt(r['test_acc'], '.4f')} | "
              f"{fmt_ratio(r, 'seconds')} | {fmt_ratio(r, 'epochs')} | {fmt_ratio(r, 'adjusted')} |")


def print_sensitivity(per_seed: list[dict[str, list[dict[str, Any]]]], targets: list[float], baseline: str,
                      costs: dict[str, float]) -> None:
    """The same runs scored at lower targets: how much the ratio depends on the target chosen."""
    print(f"\nratio {baseline} / default at other targets (same runs; seconds, epochs; medians over seeds)")
    for target in targets:
        r = next(t for t in summarise(per_seed, target, baseline, costs) if t["recipe"] == "default")
        print(f"  {target:.1%}: {fmt_ratio(r, 'seconds')}x time, {fmt_ratio(r, 'epochs')}x epochs, "
              f"{fmt_ratio(r, 'adjusted')}x load-adjusted time "
              f"(epochs per seed {', '.join(f'{x:.2f}' for x in r['epochs_ratio_per_seed'])})")


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"NAME:key=value,key=value"`` -> (name, overrides of the default recipe)."""
    name, _, body = text.partition(":")
    pairs = [item.split("=", 1) for item in body.split(",") if item]
    if not name or not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:key=value[,key=value]")
    return name, {key.strip(): yaml.safe_load(value) for key, value in pairs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke run (small data, low target)")
    parser.add_argument("--json", type=Path, help="write raw results (every run's curve) here")
    parser.add_argument("--n", type=int, default=12_000, help="images generated (70/15/15 split)")
    parser.add_argument("--size", type=int, default=32, help="image side, pixels")
    parser.add_argument("--target", type=float, default=0.99, help="validation accuracy to reach")
    parser.add_argument("--ladder", default="3,4,6", help="default recipe's epoch budgets, cheapest first")
    parser.add_argument("--cap", type=int, default=10, help="plain recipe's epoch cap")
    parser.add_argument("--plain-lrs", default="1e-3", help="plain recipe's learning rates, comma-separated; "
                                                             "the first is the baseline of the ratios")
    parser.add_argument("--batch-size", type=int, help="batch size of every recipe (default: lensforge's, 128); "
                                                          "the default recipe's lr follows it (sqrt scaling)")
    parser.add_argument("--seeds", default="0,1", help="seeds (model init, shuffling, split), comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="NAME:k=v,...",
                        help="also run the default recipe with these options changed, on the same ladder")
    parser.add_argument("--cost-rounds", type=int, default=5, help="rounds of the interleaved per-image cost timing")
    parser.add_argument("--ablate", action="store_true",
                        help="also run the default minus one ingredient at a time, at the default's budget")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.quick:
        # a smoke run of every code path: 16 px images, one budget, a low target
        args.n, args.size, args.target, args.ladder, args.cap, args.seeds = 6000, 16, 0.3, "4", 4, "0"
        args.cost_rounds = 2
    args.ladder = [int(e) for e in args.ladder.split(",")]
    args.plain_lrs = [float(lr) for lr in args.plain_lrs.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.variants = dict(args.variant)
    args.data = f"builtin:shapes?n={args.n}&size={args.size}&seed=0"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores; python {info['python']}, torch {info['torch']}, "
          f"timm {info['timm']}, lensforge {info['lensforge']}; {args.threads} torch threads, "
          f"OMP_WAIT_POLICY={info['omp_wait_policy']}; "
          f"load average {load_average():.2f}")
    print(f"data {args.data}; target val acc {args.target:.1%}; default ladder {args.ladder}; "
          f"plain cap {args.cap} epochs; batch size {args.batch_size or 'default'}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lensforge-train-speed-") as tmp:
        out = args.keep or Path(tmp)
        per_seed = [one_seed(args, seed, out) for seed in args.seeds]
        costs = image_costs(args, out)
    baseline = f"plain, AdamW lr={args.plain_lrs[0]:g}"
    print(f"\ntraining cost per image, {COST_PROBE_STEPS} steps x {args.cost_rounds} rounds interleaved: "
          + ", ".join(f"{label} {seconds * 1e3:.2f} ms" for label, seconds in costs.items()))
    table = summarise(per_seed, args.target, baseline, costs)
    print_table(table, args.target, baseline)
    targets = [t for t in (0.95, 0.97, 0.98, 0.985, 0.99, 0.995) if t < args.target]
    print_sensitivity(per_seed, targets, baseline, costs)
    wall = time.perf_counter() - started
    print(f"\nbenchmark wall time {wall:.0f} s; load average now {load_average():.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "table": table, "image_cost_s": costs, "per_seed": per_seed,
                                         "wall_s": wall}, indent=1))


if __name__ == "__main__":
    main()
