"""stress / attack / calibrate / guard / predict-with-guardrails through the console entry point."""

from __future__ import annotations

import json

import numpy as np
from helpers import run
from PIL import Image
from typer.testing import CliRunner

from lensforge.cli import app


def _one_line_error(result, code=2):
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") <= 1
    return result.stderr


def test_calibrate_then_guard_then_predict_flags(trained, tmp_path):
    calibrated = run("calibrate", str(trained))
    assert calibrated.returncode == 0, calibrated.stderr and "temperature" in calibrated.stdout
    guarded = run("guard", str(trained), "--n-ood", "64")
    assert guarded.returncode == 0, guarded.stderr
    assert "shipped:" in guarded.stdout and "mean AUROC" in guarded.stdout
    Image.fromarray(np.full((8, 8), 3, dtype=np.uint8)).save(tmp_path / "dark.png")  # black frame
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "noise.png")
    predicted = run("predict", str(trained / "bundle"), str(tmp_path))
    assert predicted.returncode == 0, predicted.stderr
    rows = {json.loads(line)["path"].rsplit("/", 1)[1]: json.loads(line) for line in predicted.stdout.splitlines()}
    assert {"ood", "ood_score", "quality", "abstain"} <= set(rows["dark.png"])
    assert "too_dark" in rows["dark.png"]["quality"] or "low_contrast" in rows["dark.png"]["quality"]


def test_attack_prints_curves_and_refuses_bad_epsilons(trained):
    result = run("attack", str(trained), "--attacks", "fgsm,pgd-linf", "--epsilons", "0,2/255,8/255",
                 "--steps", "2", "--max-images", "40")
    assert result.returncode == 0, result.stderr
    assert "fgsm" in result.stdout and "8/255" in result.stdout
    assert (trained / "stress" / "adversarial.json").exists()
    assert "epsilon" in _one_line_error(run("attack", str(trained), "--epsilons", "0,1.5"))
    unknown = _one_line_error(run("attack", str(trained), "--attacks", "apgd", "--epsilons", "-0.1"))
    assert "epsilon" in unknown  # the budget is checked before anything runs
    parsed = CliRunner().invoke(app, ["attack", str(trained), "--epsilons", "x"])  # in-process: no torch import
    assert parsed.exit_code == 2 and "fraction" in parsed.output, parsed.output


def test_stress_refuses_data_of_other_classes(trained):
    err = _one_line_error(run("stress", str(trained / "bundle"), "--data", "builtin:shapes?n=60&size=8",
                              "--split", "all"))
    assert "classes" in err


def test_list_robustness_registries():
    result = run("list", "corruptions")
    assert result.returncode == 0 and len(result.stdout.split()) == 28 and "frost" in result.stdout.split()
    for kind, expected in (("attacks", "apgd-ce"), ("ood-detectors", "vim"), ("ood-sets", "textures"),
                           ("adaptation-methods", "tent")):
        listed = CliRunner().invoke(app, ["list", kind])
        assert listed.exit_code == 0 and expected in listed.output.split(), (kind, listed.output)
