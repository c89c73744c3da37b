from __future__ import annotations

import json

import numpy as np
import pytest

from lensforge.errors import DataError, UsageError
from lensforge.evaluate import evaluate
from lensforge.evaluate.metrics import classification_metrics, confident_mistakes


def test_metrics_match_hand_computation():
    logits = np.array([[3, 0, 0], [0, 3, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0]], dtype=np.float32)
    targets = np.array([0, 1, 2, 2, 1])
    m = classification_metrics(logits, targets, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    recall = {c["name"]: c["recall"] for c in m["per_class"]}
    assert recall == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.5})
    f1 = [2 * 0.5 * 1 / 1.5, 0.5, 2 * 1 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    confidence = float(np.exp(3) / (np.exp(3) + 2))
    assert m["ece"] == pytest.approx(abs(confidence - 0.6), abs=1e-5)
    assert sum(m["reliability"]["count"]) == 5
    assert [i for i, _, _ in confident_mistakes(logits, targets)] == [2, 4]


def test_run_and_bundle_agree_and_write_eval(digits_run):
    run_dir = digits_run  # the session's digits run (exported), copied for this module: evaluation writes into it
    torch_metrics = evaluate(run_dir, split="test").metrics
    onnx_metrics = evaluate(run_dir / "bundle", split="test").metrics
    assert torch_metrics["evaluated"] == "run" and onnx_metrics["evaluated"] == "bundle"
    assert onnx_metrics["num_samples"] == torch_metrics["num_samples"] == json.loads(
        (run_dir / "splits.json").read_text())["sizes"]["test"]
    assert abs(onnx_metrics["accuracy"] - torch_metrics["accuracy"]) <= 1 / onnx_metrics["num_samples"]
    saved = json.loads((run_dir / "eval" / "test.json").read_text())
    assert saved["evaluated"] == "bundle" and len(saved["confusion"]) == 10
    for mistake in saved["mistakes"]:
        assert (run_dir / mistake["image"]).exists() and mistake["true"] != mistake["pred"]
    confidences = [m["confidence"] for m in saved["mistakes"]]
    assert confidences == sorted(confidences, reverse=True)


def test_foreign_data_needs_its_own_split_or_all(digits_run, tmp_path):
    from PIL import Image

    for digit in ("3", "7"):
        folder = tmp_path / "foreign" / digit
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    with pytest.raises(UsageError, match="--split all"):
        evaluate(digits_run, str(tmp_path / "foreign"), split="test", write=False)
    result = evaluate(digits_run, str(tmp_path / "foreign"), split="all", write=False)
    assert result.metrics["num_samples"] == 6 and len(result.metrics["confusion"]) == 10
    bad = tmp_path / "bad" / "cat"
    bad.mkdir(parents=True)
    Image.new("L", (8, 8)).save(bad / "0.png")
    with pytest.raises(DataError, match="not among the model's classes"):
        evaluate(digits_run, str(tmp_path / "bad"), split="all", write=False)
