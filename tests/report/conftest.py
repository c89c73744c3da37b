"""A realistic fake run folder, written the way training, evaluation and export write it."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_run_json(run_dir: Path, class_names: list[str]) -> None:
    _write_json(run_dir / "run.json", {
        "name": "tiny-cnn-digits", "task": "classification", "model": "resnet8",
        "data": "builtin:digits", "class_names": class_names,
        "preprocess": {"input_size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.25],
                       "interpolation": "bilinear"},
        "created": "2024-05-01T14:03:22+00:00",
        "versions": {"lensforge": "0.1.0", "torch": "2.4.1", "timm": "1.0.9"},
        "params": 78_410, "best_epoch": 4,
        "timings_s": {"data": 1.2, "train": 83.4, "evaluate": 2.1, "export": 4.7},
    })


def write_metrics(run_dir: Path, epochs: int) -> None:
    rows = []
    for epoch in range(1, epochs + 1):
        progress = epoch / epochs
        rows.append({
            "epoch": epoch, "step": epoch * 45,
            "train_loss": 1.1 * math.exp(-2.2 * progress) + 0.05,
            "train_acc": 0.55 + 0.43 * progress,
            "val_loss": 1.0 * math.exp(-1.8 * progress) + 0.12 + 0.02 * max(0, epoch - 4),
            "val_acc": 0.5 + 0.4 * progress if epoch != 3 else None,  # a gap must not crash
            "lr": 0.05 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs)),
            "images_per_s": 2150.0 + 10 * epoch, "epoch_time_s": 16.7,
        })
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (run_dir / "metrics.jsonl").write_text(text + '{"epoch": 99, "train_lo', encoding="utf-8")


def write_health(run_dir: Path) -> None:
    steps = list(range(0, 225, 15))
    layers = {name: [scale * math.exp(-0.01 * s) for s in steps]
              for name, scale in (("conv1", 0.8), ("layer1", 0.5), ("layer2", 0.2), ("fc", 1.5))}
    layers["layer2"][3] = None  # a skipped measurement
    _write_json(run_dir / "health.json", {
        "history": {"step": steps, "total": [sum(v or 0 for v in vals) for vals in
                                             zip(*layers.values())], "layers": layers},
        "events": [
            {"step": 45, "epoch": 1, "kind": "exploding", "layer": "fc", "value": 31.4,
             "action": "clipped", "message": "grad norm 31.4 > 10 x median"},
            {"step": 180, "epoch": 4, "kind": "vanishing", "layer": "conv1", "value": 3.1e-8,
             "action": "warned", "message": "grad norm below 1e-7 for 20 steps"},
        ],
        "diagnosis": ["Gradients are healthy after epoch 1."],
    })
    _write_json(run_dir / "diagnosis.json", {
        "fit": [{"kind": "overfitting", "message": "Validation loss rises after epoch 4 while "
                 "training loss keeps falling.",
                 "suggestions": ["Add augmentation (--augment strong).", "Stop earlier."]}],
        "health": ["One exploding-gradient event at step 45 was clipped."],
    })


def write_eval(run_dir: Path, split: str, class_names: list[str], mistakes: int) -> None:
    n = len(class_names)
    confusion = [[40 if i == j else 2 + i + j for j in range(n)] for i in range(n)]
    rng = np.random.default_rng(0)
    records = []
    for k in range(mistakes):
        image = f"eval/mistakes/{split}_{k:03d}.png"
        (run_dir / image).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / image).write_bytes(_png(rng.integers(0, 256, (8, 8))))
        records.append({"origin": f"digits/{k}.png", "true": class_names[k % n],
                        "pred": class_names[(k + 1) % n], "confidence": 0.6 + 0.1 * k,
                        "image": image})
    _write_json(run_dir / "eval" / f"{split}.json", {
        "split": split, "evaluated": "bundle", "num_samples": 150, "accuracy": 0.8,
        "macro_f1": 0.79, "ece": 0.043,
        "per_class": [{"name": name, "precision": 0.8, "recall": 0.75 + 0.05 * i,
                       "f1": 0.77, "support": 50} for i, name in enumerate(class_names)],
        "confusion": confusion,
        "worst_classes": [{"name": class_names[0], "recall": 0.75, "f1": 0.77}],
        "reliability": {"bin_lower": [0.0, 0.25, 0.5, 0.75], "bin_upper": [0.25, 0.5, 0.75, 1.0],
                        "confidence": [0.2, 0.4, 0.65, 0.9], "accuracy": [0.1, float("nan"),
                                                                           0.6, 0.85],
                        "count": [3, 0, 40, 107]},
        "mistakes": records,
    })


def write_bundle(run_dir: Path, class_names: list[str]) -> None:
    _write_json(run_dir / "bundle" / "manifest.json", {
        "task": "classification", "model": "resnet8", "class_names": class_names,
        "preprocess": {"input_size": [8, 8], "channels": 1},
        "files": {"model.onnx": {"sha256": "ab" * 32, "bytes": 315_221},
                  "preprocess.json": {"sha256": "cd" * 32, "bytes": 412}},
        "parity": {"max_abs_diff_logits": 2.4e-6, "max_abs_diff_features": 3.1e-6,
                   "top1_agreement": 1.0, "atol": 1e-4, "n_images": 32},
    })


def make_run(run_dir: Path, class_names: list[str], epochs: int = 5, mistakes: int = 4) -> Path:
    """Write every file a complete run folder holds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_json(run_dir, class_names)
    (run_dir / "config.yaml").write_text("model: resnet8\nepochs: 5\nlr: 0.05  # per 256\n"
                                         "note: <b>not bold</b>\n", encoding="utf-8")
    write_metrics(run_dir, epochs)
    write_health(run_dir)
    write_eval(run_dir, "test", class_names, mistakes)
    write_eval(run_dir, "val", class_names, 0)
    write_bundle(run_dir, class_names)
    return run_dir


CLASS_NAMES = ["cat", "dog", "<script>"]  # one name that must come out escaped


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    """A complete run folder of its own, for tests that change files or the registry."""
    return make_run(tmp_path / "run", CLASS_NAMES)


@pytest.fixture(scope="session")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A complete run folder and its report, written once for the read-only tests."""
    from lensforge.report import write_report

    run_dir = make_run(tmp_path_factory.mktemp("report") / "run", CLASS_NAMES)
    return run_dir, write_report(run_dir, strict=True).read_text(encoding="utf-8")
