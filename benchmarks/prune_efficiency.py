"""Structured pruning: measured latency speed-up divided by the MACs reduction, at ~2x fewer MACs.

Issue aim ("Deploy under a budget"): at a 2x MACs reduction, latency speed-up / MACs reduction
at least 0.6 (i.e. at least 1.2x faster), with the accuracy change after fine-tuning no worse
than -0.5 points.

1. the ResNet-18 run of ``int8_speed.py`` (same recipe: real digits at 32 px, 539 test images;
   reused from ``--workdir`` if there, else trained, ~2 min);
2. ``compress(run, CompressConfig(prune=RATIO, finetune_epochs=E))``: the product's own
   Torch-Pruning step (channel ratio 0.3 leaves 0.7^2 = 0.49 of the MACs: ~2.0x, read from
   the PruneReport the variant records), fine-tuning on the run's own split, export, test
   accuracy through both ONNX files, and its interleaved ORT latency guard;
3. interleaved batch-1 latency of unpruned vs pruned, PyTorch eager and ONNX Runtime;
   efficiency = speed-up / MACs reduction, per backend.

Then the same prune op on random-weight ResNet-18s at 32 and 224 px (latency only), once as
compress does it (channel counts as they fall: 64 -> 44, ...) and once with ``round_to=16``
(multiples of 16, the AVX-512 block ONNX Runtime's NCHWc convolutions use), because at
32 px batch 1 a ResNet-18 does 0.07 GFLOP and fixed per-layer costs, which pruning does not
shrink, weigh more than at 224 px (3.6 GFLOP).

    .venv/bin/python benchmarks/prune_efficiency.py              # full (~4 min reusing the run)
    .venv/bin/python benchmarks/prune_efficiency.py --quick      # ~1-minute smoke run
"""

from __future__ import annotations

import _common  # first: sets OMP_WAIT_POLICY before torch loads  # isort: skip

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

AIM_EFFICIENCY, AIM_CHANGE = 0.6, -0.5  # speed-up / MACs reduction; accuracy change in points


def pruned_trained(args: argparse.Namespace) -> dict[str, Any]:
    from lensforge.compress.variants import CompressConfig, compress
    from lensforge.data.preprocess import normalize
    from lensforge.train import load_run

    run = _common.trained_run(args.recipe, args.workdir)
    print(f"{args.model}: {'reused' if run.reused else 'trained'} {run.path} ({run.epochs} epochs, "
          f"{run.train_s or 0:.0f} s, best val {run.best_val_acc:.4f})", flush=True)
    started = time.perf_counter()
    cfg = CompressConfig(prune=args.ratio, finetune_epochs=args.finetune_epochs, distill=args.distill,
                         threads=_common.THREADS)
    result = compress(run.path, cfg, console=_quiet_console())
    compress_s = time.perf_counter() - started
    base, pruned = result.variants[0], result.variants[1]
    details = pruned.details
    macs_reduction = details["macs_reduction"]
    unpruned_model = load_run(run.path)
    pruned_model = load_run(Path(pruned.bundle).parent)
    pre = unpruned_model.preprocess
    pixels = np.random.default_rng(0).integers(0, 256, (1, pre.channels, *pre.input_size), dtype=np.uint8)
    x = normalize(pixels, pre)
    timings = _common.interleaved({
        "eager unpruned": _common.torch_call(unpruned_model.model, x),
        "eager pruned": _common.torch_call(pruned_model.model, x),
        "ORT unpruned": _common.ort_call(Path(base.bundle), pixels),
        "ORT pruned": _common.ort_call(Path(pruned.bundle), pixels),
    }, rounds=args.rounds, calls_per_round=args.calls)  # fmt: skip
    speedups = {"torch eager": timings.ratio("eager unpruned", "eager pruned"),
                "ONNX Runtime": timings.ratio("ORT unpruned", "ORT pruned")}
    return {
        "model": args.model, "input": f"{pre.channels}x{pre.input_size[0]}x{pre.input_size[1]}",
        "run": str(run.path), "reused_run": run.reused, "train_s": run.train_s, "compress_s": compress_s,
        "ratio": args.ratio, "finetune_epochs": args.finetune_epochs, "distill": args.distill,
        "params_before": details["params_before"], "params_after": details["params_after"],
        "macs_before": details["macs_before"], "macs_after": details["macs_after"], "macs_reduction": macs_reduction,
        "acc_unpruned": base.metrics["accuracy"], "acc_pruned": pruned.metrics["accuracy"],
        "test_images": base.metrics["num_samples"], "change_points": -pruned.drop_points,
        "guard_status": pruned.status, "guard_reason": pruned.reason, "timings": timings.to_dict(),
        "speedups": speedups, "efficiency": {k: v["median"] / macs_reduction for k, v in speedups.items()},
    }  # fmt: skip


def _quiet_console() -> Any:
    from rich.console import Console

    return Console(quiet=True)


def pruned_at(model_name: str, size: int, ratio: float, args: argparse.Namespace, work: Path,
              round_to: int | None = None) -> dict[str, Any]:
    """Random-weight model at ``size`` px, pruned with the same op (or ``round_to``): latency only."""
    import torch

    from lensforge.data.preprocess import Preprocess, normalize
    from lensforge.deploy.export import write_bundle
    from lensforge.models.prune import prune_model
    from lensforge.models.registry import create_model

    torch.manual_seed(0)
    unpruned = create_model(model_name, num_classes=6).eval()
    pruned = copy.deepcopy(unpruned)
    report = prune_model(pruned, torch.zeros(1, 3, size, size), ratio=ratio, round_to=round_to)
    pre = Preprocess(input_size=(size, size), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    images = np.random.default_rng(0).integers(0, 256, (4, 3, size, size), dtype=np.uint8)
    names = [f"c{i}" for i in range(6)]
    bundles = {kind: write_bundle(model, pre, names, work / f"{model_name}-{size}-{kind}-{round_to}",
                                  model_name=model_name,
                                  sample_images=images, atol=1e-2)
               for kind, model in (("unpruned", unpruned), ("pruned", pruned.eval()))}
    pixels = np.random.default_rng(1).integers(0, 256, (1, 3, size, size), dtype=np.uint8)
    x = normalize(pixels, pre)
    timings = _common.interleaved({
        "eager unpruned": _common.torch_call(unpruned, x),
        "eager pruned": _common.torch_call(pruned, x),
        "ORT unpruned": _common.ort_call(bundles["unpruned"], pixels),
        "ORT pruned": _common.ort_call(bundles["pruned"], pixels),
    }, rounds=args.rounds, calls_per_round=max(5, args.calls // 2))  # fmt: skip
    speedups = {"torch eager": timings.ratio("eager unpruned", "eager pruned"),
                "ONNX Runtime": timings.ratio("ORT unpruned", "ORT pruned")}
    return {"model": model_name, "input": f"3x{size}x{size}", "ratio": ratio, "round_to": round_to,
            "macs_reduction": report.macs_reduction,
            "params_before": report.params_before, "params_after": report.params_after,
            "timings": timings.to_dict(), "speedups": speedups,
            "efficiency": {k: v["median"] / report.macs_reduction for k, v in speedups.items()}}


def print_tables(trained: dict[str, Any], latency_rows: list[dict[str, Any]]) -> None:
    t = trained
    print(f"\n## Pruning {t['model']} ({t['input']}), channel ratio {t['ratio']}, fine-tuned "
          f"{t['finetune_epochs']} epochs{' with distillation' if t['distill'] else ''}")
    print(f"params {t['params_before']:,} -> {t['params_after']:,}; MACs {t['macs_before'] / 1e6:.1f} M -> "
          f"{t['macs_after'] / 1e6:.1f} M ({t['macs_reduction']:.2f}x fewer); test top-1 (ORT fp32, "
          f"{t['test_images']} images) {t['acc_unpruned']:.2%} -> {t['acc_pruned']:.2%} "
          f"({t['change_points']:+.2f} points); guard: {t['guard_status']}: {t['guard_reason']}")
    rows = [(t["model"], t["input"], "trained (compress)", t)]
    rows += [(r["model"], r["input"], f"random, round_to={r['round_to']}", r) for r in latency_rows]
    print("\n| model | input | weights, channels | MACs reduction | backend | unpruned ms | pruned ms | speed-up "
          "| efficiency (speed-up / MACs red.) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, shape, weights, r in rows:
        p50 = r["timings"]["p50_ms"]
        for backend, prefix in (("torch eager", "eager"), ("ONNX Runtime", "ORT")):
            print(f"| {model} | {shape} | {weights} | {r['macs_reduction']:.2f}x | {backend} | "
                  f"{p50[f'{prefix} unpruned']:.2f} | {p50[f'{prefix} pruned']:.2f} | "
                  f"{_common.fmt_ratio(r['speedups'][backend])} | {r['efficiency'][backend]:.2f} |")


def verdict(t: dict[str, Any], latency_rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for backend, efficiency in t["efficiency"].items():
        ok = efficiency >= AIM_EFFICIENCY and t["change_points"] >= AIM_CHANGE
        lines.append(f"aim ({t['model']} {t['input']}, {backend}): efficiency {efficiency:.2f} (aim >= "
                     f"{AIM_EFFICIENCY}) at {t['macs_reduction']:.2f}x fewer MACs, accuracy change "
                     f"{t['change_points']:+.2f} points (aim >= {AIM_CHANGE}): {'MET' if ok else 'MISSED'}")
    for r in latency_rows:
        shown = ", ".join(f"{backend} {value:.2f}" for backend, value in r["efficiency"].items())
        lines.append(f"  latency only, {r['model']} {r['input']} round_to={r['round_to']}: efficiency {shown} "
                     f"at {r['macs_reduction']:.2f}x fewer MACs")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke run")
    parser.add_argument("--json", type=Path, help="write raw results here")
    parser.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR, help="trained runs, reused")
    parser.add_argument("--ratio", type=float, default=0.3, help="channel ratio removed (0.3: ~2x fewer MACs)")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="lensforge compress's default")
    parser.add_argument("--round-to", default="none,16",
                        help="channel rounding of the random-weight latency rows (compress uses none)")
    parser.add_argument("--distill", action="store_true", help="fine-tune against the unpruned model")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    parser.add_argument("--calls", type=int, default=20, help="calls per model per round")
    parser.add_argument("--no-latency-rows", dest="latency_rows", action="store_false",
                        help="skip the random-weight latency rows")
    args = parser.parse_args(argv)
    args.recipe = _common.RESNET_RECIPE
    if args.quick:
        args.recipe = _common.Recipe({**args.recipe.options, "epochs": 1})
        args.finetune_epochs, args.rounds, args.calls = 1, 3, 5
    args.model = args.recipe.options["model"]
    args.round_to = [None if r == "none" else int(r) for r in args.round_to.split(",") if r]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(_common.THREADS)
    info = _common.machine()
    _common.print_header("prune_efficiency: latency speed-up / MACs reduction at ~2x fewer MACs", info)
    started = time.perf_counter()
    trained = pruned_trained(args)
    latency_rows = []
    if args.latency_rows:
        pre = args.recipe.options["image_size"]
        sizes = [64] if args.quick else [pre, 224]
        with tempfile.TemporaryDirectory(prefix="lensforge-prune-latency-") as tmp:
            latency_rows = [pruned_at(args.model, size, args.ratio, args, Path(tmp), round_to=round_to)
                      for size in sizes for round_to in args.round_to]
    print_tables(trained, latency_rows)
    lines = verdict(trained, latency_rows)
    print("\n" + "\n".join(lines))
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s; load average now {_common.load_average():.2f}")
    _common.write_json(args.json, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                   "trained": trained, "latency_224": latency_rows, "verdict": lines, "wall_s": wall})


if __name__ == "__main__":
    main()
