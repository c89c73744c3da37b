"""Pretrained backbones on a CPU budget: what a step costs, which input size, old vs new autopilot.

Three measurements, each its own subcommand (all on 2 threads, on this machine):

    python benchmarks/pretrained_budget.py costs              # per-image ms: forward / backward / top stages
    python benchmarks/pretrained_budget.py sizes              # probe (+ fine-tune) accuracy vs input size
    python benchmarks/pretrained_budget.py autopilot --reps 3 # old default vs new default, end to end

``costs`` times EfficientNet-Lite0 per image at batch 32 (an eval forward pass without
gradients; a training forward + backward through the whole network; the same with only the
top stages, ``TOP_STAGES``, trainable), fp32 vs bf16 autocast, NCHW vs channels-last,
interleaved round-robin so load drift hits every cell alike.

``sizes`` and ``autopilot`` run on a folder of real-photo patches cut by
``benchmarks/_photo_patches.py`` (1,524 patches of 96 px, 6 classes; a proxy for a real
photo folder: real pixels, but six scenes). ``sizes`` fits the linear probe at several input
sizes (test accuracy of the probe alone, feature-pass time), then trains probe + fine-tune
runs for a fixed training time at each size. ``autopilot`` runs ``lensforge.autopilot`` as
a user would with no options (default time budget) with the old pretrained recipe (224 px,
full fine-tune, NCHW, batch 128: passed as overrides) and the new default (native size, probe then
top-stages-first fine-tune), ``--reps`` times each, alternating, and reports medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import THREADS, interleaved, load_average, machine, print_header, write_json
from _photo_patches import make_photo_patches

MODEL = "tf_efficientnet_lite0"
# the old recipe's choices, now overridden explicitly: what `autopilot --data FOLDER` did before
OLD_RECIPE = {"image_size": 224, "transfer": "full", "channels_last": "off", "batch_size": 128}
TOP_STAGES = ("blocks.5", "blocks.6", "conv_head", "bn2", "classifier")  # "top stages only": last two stages + head


# ---------------------------------------------------------------------------- costs


def _cost_calls(size: int, batch: int) -> dict[str, Any]:
    import torch

    from lensforge.models.registry import create_model

    torch.set_num_threads(THREADS)
    calls = {}
    for layout in ("nchw", "cl"):
        fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
        model = create_model(MODEL, num_classes=6, pretrained="package").to(memory_format=fmt)
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
        y = torch.randint(0, 6, (batch,))
        for precision in ("fp32", "bf16"):
            for mode in ("forward", "full", "top"):
                calls[f"{mode}/{precision}/{layout}"] = _cost_call(model, x, y, mode, precision == "bf16")
    return calls


def _cost_call(model: Any, x: Any, y: Any, mode: str, bf16: bool) -> Any:
    import torch

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if mode == "forward":
                model.eval()
                with torch.no_grad():
                    model(x)
                return
            model.train()
            for name, p in model.named_parameters():
                p.requires_grad_(mode == "full" or name.startswith(TOP_STAGES))
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def costs(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in args.sizes:
        calls = _cost_calls(size, args.batch)
        timings = interleaved(calls, rounds=args.rounds, calls_per_round=1, warmup=1)
        out[str(size)] = {"ms_per_image": {n: timings.p50(n) / args.batch for n in calls},
                          "load_avg_1min": [timings.load_before, timings.load_after]}
    print(f"\nper-image ms (batch {args.batch}, median of {args.rounds} interleaved rounds):")
    print("| size | layout | precision | forward (eval, no grad) | train step, all layers | "
          "train step, top stages | load |")
    print("|---|---|---|---|---|---|---|")
    for size, cell in out.items():
        ms, load = cell["ms_per_image"], "/".join(f"{x:.1f}" for x in cell["load_avg_1min"])
        for layout in ("nchw", "cl"):
            for precision in ("fp32", "bf16"):
                row = [f"{ms[f'{mode}/{precision}/{layout}']:.1f}" for mode in ("forward", "full", "top")]
                name = "channels-last" if layout == "cl" else "NCHW"
                print(f"| {size} | {name} | {precision} | {' | '.join(row)} | {load} |")
    return out


# ---------------------------------------------------------------------------- sizes


def _probe_only(data: str, size: int, out: Path) -> dict[str, Any]:
    """Test accuracy of the linear probe alone at ``size`` (the run's first step, no fine-tuning)."""
    import torch
    from rich.console import Console

    from lensforge.train import resolve_config
    from lensforge.train.loop import Batches
    from lensforge.train.probe import clear_feature_cache, extract_features, fit_probe, probe_bf16
    from lensforge.train.trainer import _load_data

    cfg = resolve_config(None, data=data, model=MODEL, pretrained="package", image_size=size, out=str(out))
    _, table, splits, resolved, model = _load_data(cfg, Console(quiet=True))
    model.to(memory_format=torch.channels_last)
    cpu, bf16 = torch.device("cpu"), probe_bf16(torch.device("cpu"), False)
    train, val, test = (Batches(table, idx, 64, cpu, True) for idx in (splits.train, splits.val, splits.test))
    clear_feature_cache()
    result = fit_probe(model, train, val, bf16=bf16)
    with torch.no_grad():
        logits = model.get_classifier()(extract_features(model, test, bf16))
    test_acc = float((logits.argmax(1) == test.targets).float().mean())
    return {"size": size, "probe_val": result.val_acc, "probe_test": test_acc, "features_s": result.features_s,
            "images": len(train) + len(val), "bf16": bf16, "load": load_average()}


def _trained(data: str, out: Path, **options: Any) -> dict[str, Any]:
    from rich.console import Console

    from lensforge.evaluate.runner import evaluate
    from lensforge.train import resolve_config, train

    shutil.rmtree(out, ignore_errors=True)
    cfg = resolve_config(None, data=data, model=MODEL, pretrained="package", out=str(out), threads=THREADS,
                         **options)
    load, started = load_average(), time.perf_counter()
    result = train(cfg, show_progress=False, console=Console(quiet=True))
    wall = time.perf_counter() - started
    info = json.loads((out / "run.json").read_text())
    return {"options": options, "train_wall_s": wall, "epochs_run": len(result.history),
            "best_epoch": info.get("best_epoch"), "best_val": result.best_val_acc,
            "test": float(evaluate(out, split="test", write=False).metrics["accuracy"]),
            "probe": info.get("probe"), "load": [load, load_average()]}


def sizes(args: argparse.Namespace, data: str, work: Path) -> dict[str, Any]:
    probes = [_probe_only(data, size, work / f"probe-{size}") for size in args.sizes]
    print("\nlinear probe alone (frozen ImageNet features, L-BFGS head):")
    print("| input px | val acc | test acc | feature pass s (train+val images) | load |")
    print("|---|---|---|---|---|")
    for p in probes:
        print(f"| {p['size']} | {p['probe_val']:.1%} | {p['probe_test']:.1%} | {p['features_s']:.1f} "
              f"({p['images']}) | {p['load']:.2f} |")
    runs = [_trained(data, work / f"ft-{size}", image_size=size, transfer="probe", channels_last="on",
                     epochs=args.epochs, time_limit_s=args.train_s, early_stopping=0) for size in args.sizes]
    print(f"\nprobe + fine-tune, top stages first, at most {args.epochs} epochs or ~{args.train_s:.0f} s of epochs:")
    print("| input px | epochs run | best epoch | val acc | test acc | train wall s | load |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['options']['image_size']} | {r['epochs_run']} | {r['best_epoch']} | {r['best_val']:.1%} | "
              f"{r['test']:.1%} | {r['train_wall_s']:.0f} | {r['load'][0]:.1f}/{r['load'][1]:.1f} |")
    return {"probe": probes, "fine_tune": runs}


# ---------------------------------------------------------------------------- autopilot


def _autopilot(data: str, out: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console

    from lensforge.autopilot import autopilot

    load, started = load_average(), time.perf_counter()
    result = autopilot(data, out, console=Console(quiet=True), show_progress=False, **overrides)
    wall = time.perf_counter() - started
    s = result.summary
    return {"wall_s": wall, "test": s["metrics"]["test"]["accuracy"], "budget_s": s.get("budget_s"),
            "plan": s.get("plan"), "epochs_run": s.get("epochs_run"), "timings_s": s.get("timings_s"),
            "image_size": (s.get("plan") or {}).get("image_size"), "load": [load, load_average()]}


def autopilots(args: argparse.Namespace, data: str, work: Path) -> dict[str, Any]:
    recipes = {"old (224 px, full fine-tune, NCHW, batch 128)": OLD_RECIPE, "new default": {}}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in recipes}
    for rep in range(args.reps):
        for name, overrides in recipes.items():
            if name.startswith("old") and rep >= args.old_reps:
                continue
            runs[name].append(_autopilot(data, work / f"ap-{len(runs[name])}-{len(name)}", overrides))
            print(f"{name}: {runs[name][-1]['wall_s']:.0f} s, test {runs[name][-1]['test']:.1%}", flush=True)
    print("\n| recipe | reps | input px | epochs planned / run | wall s (median, range) | within 300 s | "
          "test acc (median, range) | load |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in runs.items():
        walls, tests = [r["wall_s"] for r in rows], [r["test"] for r in rows]
        loads = "/".join(f"{min(r['load'][0] for r in rows):.1f}-{max(r['load'][1] for r in rows):.1f}"
                         for _ in [0])
        epochs = ", ".join(f"{(r['plan'] or {}).get('epochs')}/{r['epochs_run']}" for r in rows)
        print(f"| {name} | {len(rows)} | {rows[0]['image_size']} | {epochs} | {statistics.median(walls):.0f} "
              f"({min(walls):.0f}-{max(walls):.0f}) | {sum(w <= 300 for w in walls)}/{len(rows)} | "
              f"{statistics.median(tests):.1%} ({min(tests):.1%}-{max(tests):.1%}) | {loads} |")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("costs", "sizes", "autopilot"))
    parser.add_argument("--sizes", type=lambda t: [int(s) for s in t.split(",")], default=None,
                        help="input sides in px (costs: 96,224; sizes: 96,128,160,224)")
    parser.add_argument("--batch", type=int, default=32, help="costs: images per timed call")
    parser.add_argument("--rounds", type=int, default=3, help="costs: interleaved rounds")
    parser.add_argument("--epochs", type=int, default=8, help="sizes: most fine-tune epochs")
    parser.add_argument("--train-s", type=float, default=120.0, help="sizes: time limit of the fine-tune epochs")
    parser.add_argument("--reps", type=int, default=3, help="autopilot: runs of the new default")
    parser.add_argument("--old-reps", type=int, default=1, help="autopilot: runs of the old recipe (slow)")
    parser.add_argument("--data", type=Path, default=None, help="an image folder (default: cut photo patches)")
    parser.add_argument("--json", type=Path, default=None, help="write raw results here")
    args = parser.parse_args()
    args.sizes = args.sizes or ([96, 224] if args.what == "costs" else [96, 128, 160, 224])
    info = machine()
    print_header(f"pretrained backbones on a CPU budget: {args.what}", info)
    work = Path(tempfile.mkdtemp(prefix="lf-pretrained-"))
    try:
        if args.what == "costs":
            results = costs(args)
        else:
            data = str(args.data or make_photo_patches(work / "photos"))
            results = sizes(args, data, work) if args.what == "sizes" else autopilots(args, data, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, {"machine": info, "what": args.what, "results": results})


if __name__ == "__main__":
    main()
