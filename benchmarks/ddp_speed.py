"""Data-parallel training on this machine: ``lensforge train --nproc 1`` vs ``--nproc 2``.

Each workload is trained through the console entry point with 1 process (torch's default
intra-op threads: one per core) and with 2 processes (torchrun, DDP over gloo, one thread
each), same config and global batch, alternating 1 and 2 for ``--rounds`` rounds so that
load drift hits both alike; round r uses seed r for both. Reported per setting, as medians
over rounds:

- **images/s**: training throughput of the job (``metrics.jsonl``'s ``images_per_s``: every
  rank's images over rank 0's epoch time), median over the epochs after the first;
- **wall s**: the whole command, process start-up, data loading, validation and
  checkpoints included: what a user waits for;
- **val acc**: the final epoch's validation accuracy (the same model quality must come out;
  the medians are over seeds).

The ratio columns are per-round ratios (2 processes / 1 process), medianed.

    .venv/bin/python benchmarks/ddp_speed.py             # ~6 minutes on 2 cores
    .venv/bin/python benchmarks/ddp_speed.py --quick     # a ~1-minute smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, print_header, write_json  # also sets OMP_WAIT_POLICY=PASSIVE, as the CLI does

LENSFORGE = str(Path(sys.executable).parent / "lensforge")
# name -> (lensforge train options, epochs): a tiny model where per-step overhead dominates, and
# a larger input where each step has more compute to split between the cores (trained until
# its accuracy has settled, so the two settings' accuracies can be compared)
WORKLOADS = {
    "tinycnn_xs, digits 8 px, batch 64": (["--data", "builtin:digits", "--model", "tinycnn_xs",
                                           "--image-size", "8", "--batch-size", "64"], 4),
    "tinycnn_s, shapes 32 px, batch 64": (["--data", "builtin:shapes?n=4000&size=32&seed=0", "--model", "tinycnn_s",
                                           "--image-size", "32", "--batch-size", "64"], 8),
}


def train_once(options: list[str], nproc: int, epochs: int, seed: int, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run([LENSFORGE, "train", *options, "--epochs", str(epochs), "--seed", str(seed),
                             "--nproc", str(nproc), "--out", str(out), "-q"], capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"lensforge train --nproc {nproc} failed:\n{result.stderr}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # the first epoch pays for warm-up (allocations, DDP buckets)
    return {"images_per_s": statistics.median(r["images_per_s"] for r in steady), "wall_s": wall_s,
            "val_acc": rows[-1]["val_acc"], "steps": rows[-1]["step"]}


def compare(name: str, options: list[str], rounds: int, epochs: int, workdir: Path) -> dict[str, Any]:
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for r in range(rounds):
        for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):  # alternate who goes first
            runs[nproc].append(train_once(options, nproc, epochs, r, workdir / f"n{nproc}"))

    def median(nproc: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[nproc])

    def ratio(key: str) -> float:
        return statistics.median(b[key] / a[key] for a, b in zip(runs[1], runs[2], strict=True))

    row = {"workload": name, "epochs": epochs, "rounds": rounds, "runs": runs,
           **{f"{key}_{n}": median(n, key) for key in ("images_per_s", "wall_s", "val_acc") for n in (1, 2)},
           "speed_ratio": ratio("images_per_s"), "wall_ratio": ratio("wall_s"),
           "same_steps": all(a["steps"] == b["steps"] for a, b in zip(runs[1], runs[2], strict=True))}
    print(f"| {name}, {epochs} epochs | {row['images_per_s_1']:,.0f} | {row['images_per_s_2']:,.0f} | "
          f"{row['speed_ratio']:.2f}x | "
          f"{row['wall_s_1']:.1f} | {row['wall_s_2']:.1f} | {row['wall_ratio']:.2f}x | "
          f"{row['val_acc_1']:.1%} / {row['val_acc_2']:.1%} | {'yes' if row['same_steps'] else 'NO'} |", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override every workload's epochs")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 epochs, the small workload only")
    parser.add_argument("--json", type=Path, default=None, help="write every run's numbers here")
    args = parser.parse_args()
    rounds, epochs = (1, 2) if args.quick else (args.rounds, args.epochs)
    workloads = dict(list(WORKLOADS.items())[:1]) if args.quick else WORKLOADS
    info = machine()
    print_header("lensforge train --nproc 1 vs --nproc 2", info)
    print(f"{rounds} round(s) per setting, alternating; 1 process: torch's default threads, "
          f"2 processes: 1 thread each (torchrun)\n")
    print("| workload | img/s 1 proc | img/s 2 procs | ratio | wall s 1 | wall s 2 | ratio | val acc 1 / 2 "
          "| same steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="lensforge-ddp-bench-") as tmp:
        rows = [compare(name, options, rounds, epochs or default_epochs, Path(tmp))
                for name, (options, default_epochs) in workloads.items()]
    write_json(args.json, {"machine": info, "results": rows})


if __name__ == "__main__":
    main()
