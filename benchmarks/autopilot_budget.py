"""Does the time-budgeted autopilot answer in time on real-size data, and what does the budget cost?

Runs ``lensforge autopilot`` (the console script, as a user does) on a large small-image
source twice, side by side in one session: with its default budget, and with ``--time-budget``
set to ``FACTOR`` x that budget. Prints the planned and measured times per step and the test
accuracy of each, so the accuracy given up for answering in minutes is a measured number.

    python benchmarks/autopilot_budget.py                       # 60,000 28-px shapes, factor 4
    python benchmarks/autopilot_budget.py --n 20000 --factor 2  # quicker

The source is ``builtin:shapes`` (6 classes, procedural, grey-free RGB) at 28 px: no 60,000-image
real folder ships with lensforge; the planner sees the same sizes and counts as on one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, print_header

LENSFORGE = str(Path(sys.executable).with_name("lensforge"))


def autopilot(data: str, out: Path, budget: str | None) -> dict:
    args = [LENSFORGE, "autopilot", "--data", data, "--out", str(out), "-q"]
    if budget:
        args += ["--time-budget", budget]
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode not in (0, 4):
        raise SystemExit(f"autopilot failed ({result.returncode}):\n{result.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "summary": summary}


def row(name: str, run: dict) -> str:
    s = run["summary"]
    plan, t = s["plan"], s["timings_s"]
    after = sum(t.get(k, 0) for k in ("export", "guardrails", "stress", "evaluate", "report"))
    return (f"| {name} | {s['budget_s']:.0f} | {run['wall_s']:.0f} | {plan['epochs']} / {s['epochs_run']} | "
            f"{plan['train_s']:.0f} / {t['train']:.0f} | {plan['after_s']:.0f} / {after:.0f} | "
            f"{s['metrics']['test']['accuracy']:.2%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60_000, help="images in the source")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels")
    parser.add_argument("--factor", type=float, default=4.0, help="the longer run's budget, x the default")
    parser.add_argument("--options", default="", help="more shapes options, e.g. 'domain=shifted' (harder data)")
    args = parser.parse_args()
    data = f"builtin:shapes?n={args.n}&size={args.size}" + (f"&{args.options}" if args.options else "")
    work = Path(tempfile.mkdtemp(prefix="lf-budget-"))
    try:
        default = autopilot(data, work / "default", None)
        longer_budget = default["summary"]["budget_s"] * args.factor
        longer = autopilot(data, work / "longer", f"{longer_budget:.0f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_header("autopilot under its default time budget vs a longer one", machine())
    print(f"data: {data}; model {default['summary']['model']} at {default['summary']['image_size']} px")
    print("| run | budget s | wall s | epochs planned / run | train s planned / measured "
          "| after-training s planned / measured | test accuracy |")
    print("|---|---|---|---|---|---|---|")
    print(row("default budget", default))
    print(row(f"{args.factor:g}x budget", longer))
    gap = (longer["summary"]["metrics"]["test"]["accuracy"] - default["summary"]["metrics"]["test"]["accuracy"]) * 100
    print(f"accuracy given up for the default budget: {gap:+.2f} points")


if __name__ == "__main__":
    main()
