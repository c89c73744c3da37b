from __future__ import annotations

import json

from lensforge.autopilot import autopilot
from lensforge.deploy import load_bundle


def test_autopilot_writes_summary_bundle_report_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = autopilot(epochs=4, show_progress=False, model="tinycnn_xs")
    second = autopilot(epochs=1, show_progress=False, model="tinycnn_xs", max_train_batches=2, guardrails=False)
    assert first.out.name == "autopilot" and second.out.name == "autopilot-2"
    summary = json.loads((first.out / "summary.json").read_text())
    for key in ("task", "data", "model", "bundle", "report", "timings_s"):
        assert key in summary
    test = summary["metrics"]["test"]
    assert test["evaluated"] == "bundle" and test["accuracy"] > 0.5 and 0 <= test["ece"] <= 1
    assert summary["data"] == "builtin:digits" and summary["task"] == "classification"
    bundle = load_bundle(summary["bundle"])
    assert bundle.class_names == [str(d) for d in range(10)]
    html = (first.out / "report.html").read_text()
    assert "Learning curves" in html and "data:image/png" in html
    # the default bundle ships its guardrails, and the report shows the stress results
    assert bundle.temperature != 1.0 and {"ood", "quality", "abstain"} <= set(bundle.manifest["guardrails"])
    assert summary["guardrails"]["ood_detector"] == bundle.manifest["guardrails"]["ood"]["detector"]
    assert (first.out / "stress" / "corruptions.json").exists() and "Corruptions and shifts" in html
    assert "guardrails" not in load_bundle(second.out / "bundle").manifest


def test_budgeted_autopilot_ships_the_pick_with_its_own_guardrails(tmp_path):
    from lensforge.select import Budget, Candidate

    result = autopilot(out=tmp_path / "budget", epochs=2, show_progress=False,
                       budget=Budget(max_latency_ms=1000, max_size_mb=100), candidates=[Candidate("tinycnn_xs", 8)])
    bundle = load_bundle(result.out / "bundle")  # hashes verify after the guardrails were written into it
    shipped = result.summary["guardrails"]
    assert bundle.temperature == shipped["temperature"] != 1.0
    assert bundle.manifest["guardrails"]["ood"]["detector"] == shipped["ood_detector"]


def test_autopilot_finds_a_learning_rate_for_a_timm_model_trained_from_scratch(tmp_path):
    from lensforge.autopilot import LR_FIND_STEPS

    result = autopilot("builtin:shapes?n=240&size=16", out=tmp_path / "r", model="resnet10t", epochs=1,
                       show_progress=False, guardrails=False, max_train_batches=2)
    found = result.summary["lr_find"]
    assert found["lr"] > 0 and (tmp_path / "r" / "lr_find" / "lr_find.png").exists()
    assert f"lr: {found['lr']}" in (tmp_path / "r" / "config.yaml").read_text()  # the run trained at it
    assert LR_FIND_STEPS >= 10
    from rich.console import Console

    from lensforge.autopilot import _lr_find_first
    from lensforge.train import resolve_config

    quiet = Console(quiet=True)
    for measured in ({"model": "tinycnn_xs"}, {"model": "resnet10t", "lr": 0.01}, {"model": "auto"}):
        assert _lr_find_first(resolve_config(None, **measured), tmp_path / "x", quiet) == {}
