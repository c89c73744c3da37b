"""Training stops on time (keeping the best epoch) and reports every epoch to a callback."""

from __future__ import annotations

import json

from lensforge.train import resolve_config, train


def test_time_limit_stops_early_and_keeps_the_best_epoch(tmp_path):
    rows: list[dict] = []
    cfg = resolve_config(None, data="builtin:digits", model="tinycnn_xs", image_size=8, epochs=500, early_stopping=0,
                         time_limit_s=3, out=str(tmp_path / "run"))
    result = train(cfg, show_progress=False, on_epoch_end=rows.append)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert 1 <= len(rows) < 500 and info["epochs_run"] == len(rows)
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert result.best_val_acc == max(r["val_acc"] for r in rows)
    assert info["status"] == "complete" and (tmp_path / "run" / "model.safetensors").exists()


def test_an_exception_from_the_callback_stops_training(tmp_path):
    class Stop(Exception):
        pass

    def stop_after_two(row: dict) -> None:
        if row["epoch"] == 2:
            raise Stop

    cfg = resolve_config(None, data="builtin:digits", model="tinycnn_xs", image_size=8, epochs=5,
                         max_train_batches=2, out=str(tmp_path / "run"))
    try:
        train(cfg, show_progress=False, on_epoch_end=stop_after_two)
    except Stop:
        pass
    else:
        raise AssertionError("the callback's exception did not stop training")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
