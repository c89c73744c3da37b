"""The corruption-suite runner on a real tiny run: bundle and PyTorch, mCE, int8 gap, stability, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run as run_cli

from lensforge.errors import UsageError
from lensforge.stress.suite import StressConfig, _shift, corruption_errors, stress


@pytest.fixture(scope="module")
def run_dir(digits_run):
    return digits_run


def test_bundle_and_run_see_the_same_corrupted_pixels(run_dir):
    cfg = StressConfig(suite="quick", max_images=120, stability=True)
    on_bundle = stress(run_dir / "bundle", cfg=cfg, compare=[], show_progress=False).summary
    on_run = stress(run_dir, cfg=cfg, compare=[], write=False, show_progress=False).summary
    assert on_bundle["kind"] == "bundle" and on_run["kind"] == "run" and on_bundle["num_images"] == 120
    for name, entry in on_bundle["corruptions"].items():  # ONNX export matches PyTorch, so do the accuracies
        for severity, accuracy in entry["accuracy"].items():
            assert accuracy == pytest.approx(on_run["corruptions"][name]["accuracy"][severity], abs=0.02)
    severities = [s for s in on_bundle["severities"]]
    assert severities == sorted(severities)
    mean_by_severity = [np.mean([e["accuracy"][str(s)] for e in on_bundle["corruptions"].values()
                                 if str(s) in e["accuracy"]]) for s in severities]
    assert mean_by_severity[0] >= mean_by_severity[-1]  # harder corruptions hurt more
    assert mean_by_severity[-1] < on_bundle["clean_accuracy"]
    stability = on_bundle["stability"]["target"]
    assert 0 <= stability["translate_flip_rate"] <= 1 and 0 <= stability["jitter_flip_rate"] <= 1
    saved = json.loads((run_dir / "stress" / "corruptions.json").read_text())
    assert saved["mean_corruption_error"] == pytest.approx(on_bundle["mean_corruption_error"])


def test_reference_gives_mce_of_one_for_itself_and_int8_gap(run_dir, tmp_path):
    from lensforge.compress.quantize import quantize_int8
    from lensforge.compress.variants import _calibration

    int8 = quantize_int8(run_dir / "bundle", tmp_path / "int8", _calibration(run_dir, 64))
    cfg = StressConfig(suite="quick", max_images=100, stability=False)
    summary = stress(run_dir / "bundle", cfg=cfg, reference=run_dir / "bundle", compare=[int8], write=False,
                     show_progress=False).summary
    assert summary["mce"] == pytest.approx(1.0) and summary["relative_mce"] == pytest.approx(1.0)
    gap = summary["compare"][0]
    assert gap["precision"] == "int8" and set(gap["gap"]["per_corruption_points"]) == set(summary["corruptions"])


def test_corruption_error_arithmetic():
    model = {"clean_accuracy": 0.9, "corruptions": {"fog": {"accuracy": {"1": 0.8, "2": 0.6}}}}
    reference = {"clean_accuracy": 0.8, "corruptions": {"fog": {"accuracy": {"1": 0.6, "2": 0.4}}}}
    errors = corruption_errors(model, reference)
    assert errors["mce"] == pytest.approx((0.2 + 0.4) / (0.4 + 0.6))
    assert errors["relative_mce"] == pytest.approx(((0.2 - 0.1) + (0.4 - 0.1)) / ((0.4 - 0.2) + (0.6 - 0.2)))


def test_shift_repeats_the_edge():
    images = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4)
    shifted = _shift(images, 1, 0)
    assert (shifted[0, 0, :, 1:] == images[0, 0, :, :-1]).all() and (shifted[0, 0, :, 0] == images[0, 0, :, 0]).all()


def test_bad_requests(run_dir, tmp_path):
    with pytest.raises(UsageError, match="suite"):
        stress(run_dir, cfg=StressConfig(suite="huge"), show_progress=False)
    with pytest.raises(UsageError, match="no such file or folder"):
        stress(tmp_path / "nothing", show_progress=False)


def test_cli_stress_and_report(run_dir, tmp_path):
    result = run_cli("stress", str(run_dir / "bundle"), "--max-images", "60", "--json", str(tmp_path / "s.json"), "-q")
    assert result.returncode == 0, result.stderr
    assert "mean corruption error" in result.stdout and json.loads((tmp_path / "s.json").read_text())["corruptions"]
    from lensforge.report import write_report

    html = write_report(run_dir).read_text()
    assert "Robustness" in html and "Corruptions and shifts" in html
    bad = run_cli("stress", str(run_dir / "bundle"), "--suite", "mega")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
