"""Achieved GFLOP/s as a share of this CPU's estimated peak: ResNet-18 at 224 px, batch 1.

The issue asks how much of the machine ONNX Runtime fp32 uses for a ResNet-type model at
batch 1, measured by the product's own ``lensforge.deploy.bench.benchmark`` (FLOPs from
torch's flop counter, peak from :func:`lensforge.utils.hardware.detect_cpu`). PyTorch
eager and OpenVINO (fp32 precision set explicitly) are measured in the same calls, and an
INT8 bundle against the int8 peak for context; batch 8 shows how much is batch-1 overhead.

``benchmark()`` times one backend after another, so this script calls it ``--rounds``
times, rotating the backend order each round, and reports medians over rounds (and their
range): a load spike from a neighbour then hits every backend in some round, not one.

The run folder is a real lensforge run of ``resnet18`` at 224 px trained for a single
batch (weights barely moved from their initialisation: latency does not depend on them).

    .venv/bin/python benchmarks/gflops_share.py             # full (~5 min)
    .venv/bin/python benchmarks/gflops_share.py --quick     # ~1-minute smoke run
"""

from __future__ import annotations

import _common  # first: sets OMP_WAIT_POLICY before torch loads  # isort: skip

import argparse
import statistics
import time
from pathlib import Path
from typing import Any


def make_run(args: argparse.Namespace) -> Path:
    """A resnet18 run at ``args.size`` px (one training batch) with its fp32 bundle."""
    from lensforge.deploy.bundle import is_bundle
    from lensforge.deploy.from_run import export_run

    recipe = _common.shapes_recipe(args.model, n=64, size=args.size, epochs=1, batch_size=8, max_train_batches=1)
    run = _common.trained_run(recipe, args.workdir)
    if not is_bundle(run.path / "bundle"):
        export_run(run.path)
    return run.path


def int8_bundle(run_dir: Path) -> Path:
    """The run's bundle quantized to int8 (calibrated on its training images), once."""
    from lensforge.compress.measure import load_test_set
    from lensforge.compress.quantize import quantize_int8
    from lensforge.deploy.bundle import is_bundle

    out = run_dir / "variants" / "int8-gflops" / "bundle"
    if not is_bundle(out):
        images = load_test_set(run_dir, split="train").images[:32]
        quantize_int8(run_dir / "bundle", out, images)
    return out


def gemm_gflops(size: int = 2048, calls: int = 5) -> float:
    """Achieved fp32 rate of torch's own large matrix multiply (median of ``calls``): a measured yardstick.

    The estimated peak rests on a clock that a VM may not report (``cpu MHz`` is the nominal
    clock; turbo is higher), so a large SGEMM measured in the same rounds is a second yardstick.
    It is not a ceiling: torch's BLAS on this AMD CPU is not its fastest fp32 kernel (ONNX
    Runtime's convolutions have run faster than it here).
    """
    import torch

    torch.set_num_threads(_common.THREADS)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up: first call allocates and picks the kernel
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def rounds(run_dir: Path, int8: Path | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``args.rounds`` calls of benchmark() on every backend, the order rotated each round."""
    from lensforge.deploy.bench import benchmark

    backends = [b for b in ("torch", "onnxruntime", "openvino") if b in args.backends]
    jobs: list[tuple[str, Path, str]] = [(b, run_dir, b) for b in backends]
    if int8 is not None:
        jobs.append(("onnxruntime int8", int8, "onnxruntime"))
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        shift = r % len(jobs)
        for label, target, backend in jobs[shift:] + jobs[:shift]:
            report = benchmark(target, backends=[backend], batches=args.batches, threads=_common.THREADS,
                               min_iters=args.min_iters, min_seconds=args.min_seconds, max_seconds=10.0)
            for row in report.rows:
                rows.append({"round": r, "label": label, "batch": row.batch, "precision": row.precision,
                             "p50_ms": row.latency_p50_ms, "mean_ms": row.latency_mean_ms, "gflops": row.gflops,
                             "utilisation": row.utilisation, "iterations": row.iterations,
                             "load_avg_1min": _common.load_average(), "flops_per_image": report.model.flops_per_image,
                             "flops_source": report.model.flops_source, "notes": report.notes})
        gemm = gemm_gflops()
        rows.append({"round": r, "label": "torch.mm 2048^2 (reference)", "batch": None, "precision": "fp32",
                     "p50_ms": None, "mean_ms": None, "gflops": gemm, "utilisation": gemm / args.peak_fp32,
                     "iterations": 5, "load_avg_1min": _common.load_average(), "flops_per_image": None,
                     "flops_source": None, "notes": []})
        print(f"  round {r + 1}/{args.rounds} done (load {_common.load_average():.2f}; "
              f"torch.mm {gemm:.0f} GFLOP/s)", flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for label, batch in dict.fromkeys((r["label"], r["batch"]) for r in rows):
        mine = [r for r in rows if r["label"] == label and r["batch"] == batch]
        if batch is None:  # the GEMM reference
            gflops = [r["gflops"] for r in mine]
            table.append({"backend": label, "batch": None, "precision": "fp32", "rounds": len(mine), "p50_ms": None,
                          "gflops": statistics.median(gflops), "gflops_range": [min(gflops), max(gflops)],
                          "utilisation": statistics.median(r["utilisation"] for r in mine),
                          "utilisation_range": [min(r["utilisation"] for r in mine),
                                                max(r["utilisation"] for r in mine)],
                          "flops_per_image": None, "flops_source": None})
            continue
        util = [r["utilisation"] for r in mine if r["utilisation"] is not None]
        table.append({"backend": label, "batch": batch, "precision": mine[0]["precision"], "rounds": len(mine),
                      "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                      "gflops": statistics.median(r["gflops"] for r in mine),
                      "gflops_range": [min(r["gflops"] for r in mine), max(r["gflops"] for r in mine)],
                      "utilisation": statistics.median(util) if util else None,
                      "utilisation_range": [min(util), max(util)] if util else None,
                      "flops_per_image": mine[0]["flops_per_image"], "flops_source": mine[0]["flops_source"]})
    return table


def print_peak(cpu: Any) -> None:
    print(f"\nCPU peak model (lensforge.utils.hardware.detect_cpu): {cpu.summary()}")
    print(f"  fp32: {cpu.fp32_flops_per_cycle_per_core} FLOP/cycle/core x {cpu.clock_ghz} GHz ({cpu.clock_source}) "
          f"x {cpu.peak_cores} physical core(s) = {cpu.peak_gflops_fp32:.1f} GFLOP/s")
    print(f"  int8: {cpu.int8_ops_per_cycle_per_core} ops/cycle/core -> {cpu.peak_gops_int8:.1f} GOP/s")
    for note in cpu.notes:
        print(f"  note: {note}")


def print_table(table: list[dict[str, Any]], model: str, size: int) -> None:
    first = next(t for t in table if t["batch"] is not None)
    flops = first["flops_per_image"]
    print(f"\n## {model} @ {size} px: {flops / 1e9:.2f} GFLOP/image ({table[0]['flops_source']}); "
          f"medians over rounds (range)")
    gemm = next((t["gflops"] for t in table if t["batch"] is None), None)
    print("| backend | precision | batch | p50 ms | achieved GFLOP/s | share of est. peak | share of torch.mm |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        vs_gemm = f"{t['gflops'] / gemm:.0%}" if gemm and t["precision"] == "fp32" else "-"
        p50 = "-" if t["p50_ms"] is None else f"{t['p50_ms']:.2f}"
        batch = "-" if t["batch"] is None else t["batch"]
        share = "-" if t["utilisation"] is None else (
            f"{t['utilisation']:.1%} ({t['utilisation_range'][0]:.1%}-{t['utilisation_range'][1]:.1%})")
        print(f"| {t['backend']} | {t['precision']} | {batch} | {p50} | {t['gflops']:.1f} "
              f"({t['gflops_range'][0]:.1f}-{t['gflops_range'][1]:.1f}) | {share} | {vs_gemm} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke run")
    parser.add_argument("--json", type=Path, help="write raw results here")
    parser.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR, help="the run folder, reused")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--backends", default="torch,onnxruntime,openvino")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 bundle rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-iters", type=int, default=30)
    parser.add_argument("--min-seconds", type=float, default=1.5)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.rounds, args.min_iters, args.min_seconds = 64, "1", 2, 10, 0.3
    args.batches = [int(b) for b in args.batches.split(",")]
    args.backends = [b for b in args.backends.split(",") if b]
    if "openvino" in args.backends:
        try:
            import openvino  # noqa: F401
        except ImportError:
            print("openvino not installed: its rows are skipped (pip install 'lensforge[openvino]')")
            args.backends.remove("openvino")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from lensforge.utils.hardware import detect_cpu

    torch.set_num_threads(_common.THREADS)
    info = _common.machine()
    _common.print_header("gflops_share: achieved GFLOP/s vs the estimated peak, batch 1", info)
    started = time.perf_counter()
    cpu = detect_cpu()
    print_peak(cpu)
    args.peak_fp32 = cpu.peak_gflops_fp32
    run_dir = make_run(args)
    int8 = int8_bundle(run_dir) if args.int8 else None
    print(f"run {run_dir}; benchmarking {', '.join(args.backends)}{' + int8' if int8 else ''} at batch "
          f"{args.batches}, {args.rounds} rounds", flush=True)
    rows = rounds(run_dir, int8, args)
    table = summarise(rows)
    print_table(table, args.model, args.size)
    ort = next(t for t in table if t["backend"] == "onnxruntime" and t["batch"] == 1)
    gemm = next(t for t in table if t["batch"] is None)
    line = (f"ONNX Runtime fp32, batch 1: {ort['gflops']:.1f} GFLOP/s = {ort['utilisation']:.1%} of the estimated "
            f"{cpu.peak_gflops_fp32:.0f} GFLOP/s fp32 peak, {ort['gflops'] / gemm['gflops']:.0%} of torch.mm's "
            f"{gemm['gflops']:.0f} GFLOP/s")
    print("\n" + line)
    notes = sorted({n for r in rows for n in r["notes"] if not n.startswith("1-minute load")})
    for note in notes:
        print(f"  bench note: {note}")
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s; load average now {_common.load_average():.2f}")
    _common.write_json(args.json, {"machine": info, "cpu": cpu.to_dict(),
                                   "args": {k: str(v) for k, v in vars(args).items()}, "table": table,
                                   "rows": rows, "summary": line, "wall_s": wall})


if __name__ == "__main__":
    main()
