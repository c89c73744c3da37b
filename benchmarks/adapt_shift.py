"""Domain adaptation: target error before and after bn, tent, pseudo-label and finetune.

Issue aim ("Generalization"): BN or TENT cut the target error by at least 50% relative.

- **source run**: ``tinycnn_s`` trained with the default recipe on clean ``builtin:shapes``
  (8,000 images at 32 px, 8 epochs: ~99% test accuracy, ~90 s; the same recipe as the
  distillation teacher, so it is reused from ``--workdir``); one run per seed (training seed);
- **targets**: ``builtin:shapes`` (2,000 images, another seed: other scenes than the
  source's) under the ``domain=shifted`` preset and under parts of it on their own:
  ``photometric`` (its lighting 0.35, blur 0.6 and cool cast), ``noise`` (its sensor noise
  0.08), ``clutter`` (its clutter 0.6);
- every method adapts on half of the target (unlabelled; ``finetune`` reads 60 labels of
  it) and is scored on the other half, through the adapted *bundle* (ONNX Runtime); the
  source test split gives the forgetting; medians over seeds;
- **oracle** (``--oracle``): the same recipe trained on the shifted domain itself, scored on the
  shifted target: the accuracy a model of this size reaches there with this budget.

    .venv/bin/python benchmarks/adapt_shift.py            # full (~15 min: 3 seeds, 4 targets)
    .venv/bin/python benchmarks/adapt_shift.py --quick    # ~2-minute smoke run
"""

from __future__ import annotations

import _common  # first: sets OMP_WAIT_POLICY before torch loads  # isort: skip

import argparse
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

AIM_REDUCTION = 0.5  # relative target-error reduction by bn or tent
TARGETS = {
    "shifted": "domain=shifted",
    "photometric": "lighting=0.35&blur=0.6&color_cast=0.9,1.0,1.15",
    "noise": "noise=0.08",
    "clutter": "clutter=0.6",
}
METHODS = {"bn": {}, "tent": {}, "pseudo-label": {}, "finetune": {"labels": 60}}


def target_spec(args: argparse.Namespace, name: str, seed: int) -> str:
    return f"builtin:shapes?n={args.target_n}&size={args.size}&seed={100 + seed}&{TARGETS[name]}"


def adapt_once(args: argparse.Namespace, run_dir: Path, target: str, method: str, seed: int) -> dict[str, Any]:
    """One adaptation into a scratch folder (removed after): its report figures and timings."""
    from lensforge.stress.adapt import adapt

    out = args.workdir / "adapted" / f"{run_dir.name}-{target}-{method}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    result = adapt(run_dir, target_spec(args, target, seed), method=method, out=out, seed=seed, **METHODS[method])
    report = result.report
    shutil.rmtree(out, ignore_errors=True)
    accuracy = report["target_accuracy"]
    error_before, error_after = 1 - accuracy["before"], 1 - accuracy["after_bundle"]
    return {"seed": seed, "target": target, "method": method, "error_before": error_before,
            "error_after": error_after, "reduction": (error_before - error_after) / error_before,
            "source_before": report["source_accuracy"]["before"], "source_after": report["source_accuracy"]["after"],
            "torch_after": accuracy["after"], "adapt_s": result.timings_s["adapt"],
            "total_s": result.timings_s["total"], "held_out": report["split"]["held_out"]}


def oracle_accuracy(args: argparse.Namespace) -> tuple[float, Path]:
    """The source recipe trained on the shifted domain, scored on seed 0's shifted target."""
    from lensforge.evaluate.runner import evaluate

    recipe = _common.recipe(args.model, data=f"builtin:shapes?n={args.n}&size={args.size}&seed=0&domain=shifted",
                            size=args.size, epochs=args.epochs)
    run = _common.trained_run(recipe, args.workdir)
    metrics = evaluate(run.path, target_spec(args, "shifted", 0), split="all", write=False).metrics
    return float(metrics["accuracy"]), run.path


def print_table(rows: list[dict[str, Any]], targets: list[str]) -> None:
    def median(target: str, method: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["target"] == target and r["method"] == method)

    print("\n## target error (held-out half, through the bundle): before -> after (relative reduction); "
          "medians over seeds")
    print("| target | before | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for target in targets:
        before = statistics.median(r["error_before"] for r in rows if r["target"] == target)
        cells = [f"{median(target, m, 'error_after'):.1%} ({-median(target, m, 'reduction'):+.0%})" for m in METHODS]
        print(f"| {target} | {before:.1%} | " + " | ".join(cells) + " |")
    print("\n## source test accuracy after adaptation (forgetting); before: "
          f"{statistics.median(r['source_before'] for r in rows):.1%}")
    print("| target | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for target in targets:
        print(f"| {target} | " + " | ".join(f"{median(target, m, 'source_after'):.1%}" for m in METHODS) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~2-minute smoke run")
    parser.add_argument("--json", type=Path, help="write raw results here")
    parser.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR, help="source runs, reused")
    parser.add_argument("--model", default="tinycnn_s")
    parser.add_argument("--n", type=int, default=8000, help="source images generated (70/15/15 split)")
    parser.add_argument("--size", type=int, default=32, help="image side, pixels")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--target-n", type=int, default=2000, help="target images: half adapt, half held out")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--oracle", action="store_true", help="also train the recipe on the shifted domain")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.n, args.epochs, args.target_n, args.seeds = "tinycnn_xs", 3000, 6, 600, "0"
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.targets = args.targets.split(",")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(_common.THREADS)
    info = _common.machine()
    _common.print_header("adapt_shift: target error before and after test-time / domain adaptation", info)
    started = time.perf_counter()
    rows, runs = [], []
    for seed in args.seeds:
        recipe = _common.shapes_recipe(args.model, n=args.n, size=args.size, epochs=args.epochs, seed=seed)
        run = _common.trained_run(recipe, args.workdir)
        runs.append({"seed": seed, "run": str(run.path), "reused": run.reused, "train_s": run.train_s,
                     "best_val_acc": run.best_val_acc})
        print(f"seed {seed}: source run {'reused' if run.reused else 'trained'} {run.path} "
              f"({run.epochs} epochs, {run.train_s or 0:.0f} s, val {run.best_val_acc:.2%})", flush=True)
        for target in args.targets:
            for method in METHODS:
                row = adapt_once(args, run.path, target, method, seed)
                rows.append(row)
                print(f"  {target:12s} {method:12s} error {row['error_before']:.1%} -> {row['error_after']:.1%} "
                      f"({-row['reduction']:+.0%}); source {row['source_before']:.1%} -> {row['source_after']:.1%}; "
                      f"adapt {row['adapt_s']:.1f} s", flush=True)
    print_table(rows, args.targets)
    oracle = None
    if args.oracle:
        oracle, oracle_run = oracle_accuracy(args)
        print(f"\noracle: {args.model} trained on domain=shifted with the same recipe ({oracle_run}): "
              f"{oracle:.1%} accuracy on the shifted target (error {1 - oracle:.1%})")
    verdicts = []
    for target in args.targets:
        best = max(statistics.median(r["reduction"] for r in rows if r["target"] == target and r["method"] == m)
                   for m in ("bn", "tent"))
        verdicts.append(f"{target}: best of bn/tent cuts target error by {best:.0%} relative "
                        f"(aim >= {AIM_REDUCTION:.0%}): {'MET' if best >= AIM_REDUCTION else 'MISSED'}")
    print("\naim:\n" + "\n".join(verdicts))
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s; load average now {_common.load_average():.2f}")
    _common.write_json(args.json, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                   "source_runs": runs, "rows": rows, "oracle_accuracy": oracle,
                                   "verdicts": verdicts, "wall_s": wall})


if __name__ == "__main__":
    main()
