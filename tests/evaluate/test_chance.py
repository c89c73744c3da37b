"""Chance level: the numbers, and every place that must flag or refuse a model at chance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run

from lensforge.evaluate.metrics import chance_level, classification_metrics
from lensforge.evaluate.runner import shipped_metrics


def test_balanced_six_classes_at_one_in_six_is_chance():
    targets = np.repeat(np.arange(6), 50)
    assert chance_level(targets, 6, 1 / 6) == {"chance_accuracy": pytest.approx(1 / 6), "at_chance": True}
    assert not chance_level(targets, 6, 0.5)["at_chance"]


def test_majority_class_rate_is_chance_on_imbalanced_data():
    targets = np.array([0] * 80 + [1] * 20)
    assert chance_level(targets, 2, 0.80)["at_chance"]  # always answering class 0 scores 80%
    assert not chance_level(targets, 2, 0.95)["at_chance"]


def test_the_margin_shrinks_with_more_images():
    small, large = np.repeat(np.arange(10), 10), np.repeat(np.arange(10), 1000)
    assert chance_level(small, 10, 0.15)["at_chance"]  # 100 images: 15% is within noise of 10%
    assert not chance_level(large, 10, 0.15)["at_chance"]


def test_metrics_carry_the_verdict():
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(4), 25)
    noise = classification_metrics(rng.standard_normal((100, 4)).astype(np.float32), targets, list("abcd"))
    perfect = classification_metrics(np.eye(4, dtype=np.float32)[targets] * 5, targets, list("abcd"))
    assert noise["at_chance"] and not perfect["at_chance"]


def test_shipped_metrics_apply_the_temperature_and_keep_the_raw_ece():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 3, 300)
    logits = (np.eye(3)[targets] * 2 + rng.standard_normal((300, 3))).astype(np.float32) * 4  # over-confident
    raw = shipped_metrics(logits, targets, list("abc"))
    cooled = shipped_metrics(logits, targets, list("abc"), temperature=4.0)
    assert "ece_uncalibrated" not in raw and raw["temperature"] == 1.0
    assert cooled["accuracy"] == raw["accuracy"]
    assert cooled["ece_uncalibrated"] == pytest.approx(raw["ece"])
    assert cooled["ece"] == pytest.approx(classification_metrics(logits / 4.0, targets, list("abc"))["ece"])
    assert cooled["ece"] != pytest.approx(raw["ece"])


@pytest.fixture(scope="module")
def chance_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run that learned nothing: one epoch at a learning rate of 1e-7."""
    from lensforge.deploy.from_run import export_run
    from lensforge.evaluate import evaluate
    from lensforge.train import resolve_config, train

    out = tmp_path_factory.mktemp("chance") / "run"
    train(resolve_config(None, data="builtin:digits", model="tinycnn_xs", image_size=8, epochs=1, lr=1e-7,
                         out=str(out)), show_progress=False)
    export_run(out)
    metrics = evaluate(out / "bundle").metrics
    assert metrics["at_chance"], metrics["accuracy"]
    return out


def test_compress_refuses_a_chance_parent_unless_forced(chance_run: Path):
    refused = run("compress", str(chance_run), "--quantize", "fp16")
    assert refused.returncode == 4, refused.stderr
    assert "chance" in refused.stderr and "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert not (chance_run / "variants").exists()
    forced = run("compress", str(chance_run), "--quantize", "fp16", "--force")
    assert forced.returncode == 0, forced.stderr


def test_report_opens_with_a_chance_banner(chance_run: Path):
    from lensforge.report import write_report

    html = Path(write_report(chance_run)).read_text()
    assert "At chance level" in html
    diagnosis = json.loads((chance_run / "diagnosis.json").read_text())
    assert [item["kind"] for item in diagnosis["fit"]] == ["underfitting"]  # not "healthy" after one epoch


def test_autopilot_at_chance_ships_no_guardrails_and_fails(tmp_path: Path):
    from lensforge.autopilot import autopilot
    from lensforge.errors import ChanceLevelError

    result = autopilot(out=tmp_path / "a", epochs=1, lr=1e-7, show_progress=False, model="tinycnn_xs",
                       image_size=8)
    assert result.summary["at_chance"] and result.summary["guardrails"] == {}
    assert "most frequent class" in result.summary["diagnosis"]
    assert any("at chance level" in line for line in result.summary_lines())
    with pytest.raises(ChanceLevelError) as caught:
        result.raise_if_failed()
    assert caught.value.exit_code == 4


def test_select_leaves_chance_candidates_out(chance_run: Path):
    from rich.console import Console

    from lensforge.errors import ChanceLevelError
    from lensforge.select import Budget, _options

    refused: dict[str, str] = {}
    with pytest.raises(ChanceLevelError, match="every candidate trained to chance level"):
        _options([chance_run], Budget(max_latency_ms=100), quantize=False, prune=None, threads=1,
                 console=Console(quiet=True), refused=refused)
    assert "most frequent class" in refused[chance_run.name]


def test_evaluate_says_at_chance(chance_run: Path):
    result = run("evaluate", str(chance_run / "bundle"))
    assert result.returncode == 0, result.stderr
    assert "at chance level" in result.stderr and "most frequent class" in result.stderr
