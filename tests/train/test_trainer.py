from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lensforge.errors import ArtifactError, ConfigError, UsageError
from lensforge.train import load_run, resolve_config, train
from lensforge.train.checkpoint import load_checkpoint
from lensforge.train.optim import schedule_factor

TINY = dict(data="builtin:digits", model="tinycnn_xs", image_size=8, batch_size=64)


def _cfg(tmp_path, name="run", **kw):
    return resolve_config(None, **{**TINY, "out": str(tmp_path / name), "epochs": 2, **kw})


def test_train_writes_a_self_describing_run(tmp_path):
    result = train(_cfg(tmp_path), show_progress=False)
    run = result.run_dir
    for name in ("config.yaml", "run.json", "splits.json", "metrics.jsonl", "health.json", "diagnosis.json",
                 "model.safetensors", "checkpoints/latest.json"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["val_acc"] > 0.5
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["preprocess"]["input_size"] == [8, 8]
    loaded = load_run(run)  # rebuilt from the run's own files
    x = torch.zeros(2, 1, 8, 8)
    assert torch.allclose(loaded.model(x), result.model.eval()(x), atol=1e-6)
    splits = json.loads((run / "splits.json").read_text())
    assert sum(splits["sizes"].values()) == 1797
    diagnosis = json.loads((run / "diagnosis.json").read_text())
    assert diagnosis["fit"] and diagnosis["health"]


def test_config_round_trip_and_errors(tmp_path):
    cfg = _cfg(tmp_path, lr=0.01)
    again = resolve_config(None, **cfg.model_dump())
    assert again == cfg
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus: unknown option"):
        resolve_config(path)
    with pytest.raises(ConfigError, match="epochs"):
        resolve_config(None, epochs=0)


def test_refuses_to_overwrite_and_resume_needs_a_run(tmp_path):
    train(_cfg(tmp_path, epochs=1, max_train_batches=2), show_progress=False)
    with pytest.raises(UsageError, match="already holds a run"):
        train(_cfg(tmp_path, epochs=1), show_progress=False)
    with pytest.raises(UsageError, match="no run to resume"):
        train(_cfg(tmp_path, name="other"), resume=True, show_progress=False)


def test_resume_continues_exactly(tmp_path):
    """Two epochs, then resume to four == four straight (same weights, bit for bit)."""
    straight = train(_cfg(tmp_path, "a", epochs=4, max_train_batches=4, early_stopping=0), show_progress=False)
    cfg = _cfg(tmp_path, "b", epochs=4, max_train_batches=4, early_stopping=0)
    from lensforge.train import trainer

    original = trainer._end_of_epoch

    def crash_after_two(ctx, run_dir, writer):
        original(ctx, run_dir, writer)
        if ctx.state.epoch == 2:
            raise KeyboardInterrupt  # as if killed right after the second checkpoint

    trainer._end_of_epoch = crash_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, show_progress=False)
    finally:
        trainer._end_of_epoch = original
    assert load_checkpoint(tmp_path / "b").epoch == 2
    resumed = train(cfg, resume=True, show_progress=False)
    a = load_file(straight.run_dir / "checkpoints" / "epoch-0004" / "model.safetensors")
    b = load_file(resumed.run_dir / "checkpoints" / "epoch-0004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]


def test_damaged_checkpoint_is_not_taken_for_good(tmp_path):
    result = train(_cfg(tmp_path, epochs=1, max_train_batches=2), show_progress=False)
    latest = json.loads((result.run_dir / "checkpoints" / "latest.json").read_text())
    weights = result.run_dir / "checkpoints" / latest["dir"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="damaged"):
        load_checkpoint(result.run_dir)


def test_nan_loss_is_skipped_and_recorded(tmp_path, monkeypatch):
    calls = {"n": 0}

    class NanOnce(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            calls["n"] += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NanOnce)
    result = train(_cfg(tmp_path, epochs=1, max_train_batches=6), show_progress=False)
    health = json.loads((result.run_dir / "health.json").read_text())
    kinds = [e["kind"] for e in health["events"]]
    assert "nonfinite_loss" in kinds and "lr_backoff" in kinds
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_linear_probe_freezes_backbone(tmp_path):
    from lensforge.models import create_model
    from lensforge.train.optim import apply_transfer

    model = create_model("resnet10t", num_classes=3)
    assert apply_transfer(model, "linear", 0, 4) == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert apply_transfer(model, "gradual", 1, 4) >= 1
    assert apply_transfer(model, "gradual", 2, 4) == apply_transfer(model, "full", 0, 4)


@pytest.mark.parametrize("kind", ["onecycle", "cosine", "constant"])
def test_schedules_warm_up_and_end_low(kind):
    values = [schedule_factor(s, 100, 10, kind) for s in range(100)]
    assert values[0] < values[20] and max(values) <= 1.0
    if kind != "constant":
        assert values[-1] < 0.05


def test_mixup_cutmix_and_ema_train(tmp_path, monkeypatch):
    """The loss sees mixed soft targets, the EMA weights are not the raw ones, and the model learns."""
    from timm.loss import SoftTargetCrossEntropy

    row_max = []
    soft_loss = SoftTargetCrossEntropy.forward

    def spy(self, x, target):
        row_max.append(target.max(1).values)
        return soft_loss(self, x, target)

    monkeypatch.setattr(SoftTargetCrossEntropy, "forward", spy)
    cfg = _cfg(tmp_path, epochs=2, max_train_batches=3, mixup=0.2, cutmix=1.0, ema=True, ema_decay=0.5)
    result = train(cfg, show_progress=False)
    unmixed = 1 - cfg.label_smoothing + cfg.label_smoothing / 10  # a one-hot row after label smoothing
    assert len(row_max) == 2 * 3 and bool((torch.cat(row_max) < unmixed - 0.01).any())  # two classes in a row
    rows = result.history
    assert rows[-1]["train_loss"] < 0.9 * rows[0]["train_loss"]  # measured: 2.70 -> 2.21
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["status"] == "complete"
    checkpoint = result.run_dir / "checkpoints" / "epoch-0002"
    ema, raw = load_file(checkpoint / "ema.safetensors"), load_file(checkpoint / "model.safetensors")
    assert set(ema) == set(raw) == set(result.model.state_dict())
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())
