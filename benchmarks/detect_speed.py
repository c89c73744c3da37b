"""Detection on a CPU budget: lensforge's default detector against torchvision's SSDlite, then INT8.

    python benchmarks/detect_speed.py train --budget 600            # both detectors, equal training time
    python benchmarks/detect_speed.py int8 --run RUN                # fp32 vs INT8 ONNX Runtime of a run's bundle

``train``: ``builtin:shapes?task=detect`` at 256 px (``--n`` images, 70% of them train: the
default 4,400 gives 3,080 training images), split by lensforge. lensforge's default detector
(``model auto``: FCOS-style ``fcos_tiny`` from scratch) trains through ``lensforge.train``
with ``--budget`` seconds as its time limit; torchvision's ``ssdlite320_mobilenet_v3_large``
(no pretrained weights for either) trains on the same letterboxed training images, AdamW,
cosine schedule, horizontal flips, for the same wall-clock time (the same stopping rule: no
epoch that would end past the budget). Both are scored on the same test images with the same
COCO evaluation (torchmetrics + faster-coco-eval) in original-image pixels: mAP@[.5:.95] and
mAP50, lensforge's through its exported ONNX bundle (the artifact that ships).

``int8``: quantizes the run's bundle with ``lensforge compress --quantize int8`` machinery
and times fp32 against INT8 with ONNX Runtime, interleaved, batch 1, with the mAP of each.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from _common import THREADS, load_average, machine, print_header, write_json

DATA = "builtin:shapes?task=detect&n={n}&size=256&seed=0"


def train_lensforge(data: str, out: Path, budget_s: float, epochs: int) -> dict[str, Any]:
    from lensforge.evaluate import evaluate
    from lensforge.train import resolve_config, train

    started = time.perf_counter()
    cfg = resolve_config(None, data=data, out=str(out), epochs=epochs, time_limit_s=budget_s, threads=THREADS,
                         early_stopping=0)
    result = train(cfg, show_progress=False)
    train_s = time.perf_counter() - started
    from lensforge.deploy.from_run import export_run

    export_run(out)
    test = evaluate(out / "bundle", split="test").metrics
    return {"model": result.resolved.model_name, "epochs": len(result.history), "train_s": round(train_s, 1),
            "map": test["map"], "map50": test["map50"], "evaluated": "ONNX bundle"}


def train_ssdlite(data: str, run_dir: Path, budget_s: float, epochs: int, batch_size: int = 32) -> dict[str, Any]:
    """torchvision SSDlite on lensforge's own split of the same data, for the same wall-clock time."""
    import torch
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    from lensforge.data.preprocess import Preprocess
    from lensforge.data.sources import open_source
    from lensforge.data.splits import load_splits
    from lensforge.data.table import load_table
    from lensforge.evaluate.detection import detection_metrics
    from lensforge.evaluate.detection_runner import original_targets
    from lensforge.tasks.detection import Detections

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    source = open_source(data)
    table = load_table(source, Preprocess(input_size=(256, 256), channels=3, fit="letterbox"))
    splits = load_splits(run_dir / "splits.json", table)  # lensforge's split: the same images
    names = list(table.class_names)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=len(names) + 1)
    steps = math.ceil(len(splits.train) / batch_size) * epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    started, epochs_run = time.perf_counter(), 0
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        order = splits.train[torch.randperm(len(splits.train), generator=generator).numpy()]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            images, targets = [], []
            for i in idx:
                image = torch.from_numpy(table.images[i]).float().div(255)
                boxes = torch.from_numpy(table.targets[i].boxes).clone()
                if torch.rand(1, generator=generator).item() < 0.5:  # horizontal flip
                    image = image.flip(-1)
                    boxes[:, [0, 2]] = 256 - boxes[:, [2, 0]]
                images.append(image)
                targets.append({"boxes": boxes, "labels": torch.from_numpy(table.targets[i].labels) + 1})
            losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        epochs_run = epoch + 1
        elapsed = time.perf_counter() - started
        if elapsed + elapsed / epochs_run > budget_s:  # lensforge's rule: no epoch that would end past the budget
            break
    train_s = time.perf_counter() - started
    model.eval()
    model.score_thresh = 0.05  # the same floor lensforge's mAP uses
    test = splits.test
    found = []
    with torch.no_grad():
        for start in range(0, len(test), 64):
            idx = test[start:start + 64]
            out = model([torch.from_numpy(table.images[i]).float().div(255) for i in idx])
            for i, o in zip(idx, out):
                scale = min(256 / table.sizes[i][1], 256 / table.sizes[i][0])
                found.append(Detections(o["boxes"].numpy() / scale, o["scores"].numpy(), o["labels"].numpy() - 1))
    metrics = detection_metrics(found, original_targets(table, test, names), names)
    return {"model": "ssdlite320_mobilenet_v3_large", "epochs": epochs_run, "train_s": round(train_s, 1),
            "map": metrics["map"], "map50": metrics["map50"], "evaluated": "PyTorch", "params": int(
                sum(p.numel() for p in model.parameters())), "test_images": int(len(test)),
            "train_images": int(len(splits.train))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--n", type=int, default=4400)
    t.add_argument("--budget", type=float, default=600.0, help="training seconds for each detector")
    t.add_argument("--epochs", type=int, default=60, help="the most epochs (the budget usually stops first)")
    t.add_argument("--workdir", type=Path, default=Path("/tmp/lensforge-bench-runs/detect"))
    t.add_argument("--json", type=Path)
    q = sub.add_parser("int8")
    q.add_argument("--run", type=Path, required=True)
    q.add_argument("--json", type=Path)
    args = parser.parse_args()
    info = machine()
    print_header(f"detect_speed {args.command}", info)
    if args.command == "train":
        data = DATA.format(n=args.n)
        run = args.workdir / f"fcos-{args.n}-{int(args.budget)}s"
        ours = train_lensforge(data, run, args.budget, args.epochs)
        print(f"lensforge {ours['model']}: {ours['epochs']} epochs in {ours['train_s']:.0f} s, "
              f"test mAP {ours['map']:.3f}, mAP50 {ours['map50']:.3f}")
        theirs = train_ssdlite(data, run, args.budget, args.epochs)
        print(f"SSDlite: {theirs['epochs']} epochs in {theirs['train_s']:.0f} s, test mAP {theirs['map']:.3f}, "
              f"mAP50 {theirs['map50']:.3f}")
        write_json(args.json, {"machine": info, "data": data, "budget_s": args.budget, "lensforge": ours,
                               "ssdlite": theirs, "run": str(run), "load_after": load_average()})
    else:
        from _detect_int8 import int8_report

        write_json(args.json, {"machine": info, **int8_report(args.run)})


if __name__ == "__main__":
    main()
