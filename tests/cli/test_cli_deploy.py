"""bench / compress / select / autopilot-with-budget through the console entry point."""

from __future__ import annotations

import json

from helpers import run


def test_bench_writes_json_beside_the_run(trained):
    result = run("bench", str(trained), "--batch", "1,4", "--backend", "torch,onnxruntime")
    assert result.returncode == 0, result.stderr
    report = json.loads((trained / "bench.json").read_text())
    rows = {(r["backend"], r["batch"]) for r in report["rows"]}
    assert rows == {("torch", 1), ("torch", 4), ("onnxruntime", 1), ("onnxruntime", 4)}
    bad = run("bench", str(trained), "--backend", "onnxruntme")
    assert bad.returncode == 2 and "onnxruntime" in bad.stderr


def test_compress_int8_prints_variants_and_reports(trained):
    result = run("compress", str(trained), "--quantize", "int8", "--max-drop", "2")
    assert result.returncode == 0, result.stderr
    assert "int8" in result.stdout and "accuracy" in result.stdout
    assert "Deployment" in (trained / "report.html").read_text()
    bad = run("compress", str(trained), "--quantize", "int4")
    assert bad.returncode == 2 and "quantize" in bad.stderr


def test_autopilot_budget_not_met_says_by_how_much(tmp_path):
    result = run("autopilot", "--max-latency-ms", "0.000001", "--epochs", "1", "--out", str(tmp_path / "a"), "-q")
    assert result.returncode == 3
    assert "latency" in result.stderr and "x over" in result.stderr
    assert not (tmp_path / "a" / "summary.json").exists() and not (tmp_path / "a" / "bundle").exists()


def test_train_with_teacher_distils(trained, tmp_path):
    result = run("train", "--data", "builtin:digits", "--model", "tinycnn_xs", "--image-size", "8", "--epochs", "1",
                 "--max-train-batches", "3", "--teacher", str(trained / "bundle"),
                 "--splits-file", str(trained / "splits.json"), "--out", str(tmp_path / "student"), "-q")
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "student" / "run.json").read_text())
    assert info["teacher"] == str(trained / "bundle")
    assert json.loads((tmp_path / "student" / "splits.json").read_text())["test"] == json.loads(
        (trained / "splits.json").read_text())["test"]


def test_cli_predict_never_imports_torch(trained, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    Image.new("L", (8, 8), 200).save(tmp_path / "x.png")
    code = ("import sys; sys.modules['torch'] = None; "  # any torch import now fails
            f"sys.argv = ['lensforge', 'predict', {str(trained / 'bundle')!r}, {str(tmp_path / 'x.png')!r}]; "
            "from lensforge.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.strip().splitlines()[0])
    assert row["label"] in [str(d) for d in range(10)] and 0 < row["confidence"] <= 1
