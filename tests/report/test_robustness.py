"""The Robustness section, from the files the real stress stages write for a tiny run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from helpers import slow_fixture

from lensforge.report import RunFiles, write_report
from lensforge.report.robustness import robustness_section

PNG_URI = re.compile(r'src="data:image/png;base64,')


@slow_fixture(scope="module")
def stressed_run(guarded_digits_run_template, tmp_path_factory):
    """The session's calibrated and guarded digits run, copied, then stressed and attacked."""
    from lensforge.stress.attacks_run import adversarial
    from lensforge.stress.suite import StressConfig, stress

    out = Path(shutil.copytree(guarded_digits_run_template, tmp_path_factory.mktemp("robustness") / "run"))
    stress(out / "bundle", cfg=StressConfig(max_images=60), compare=[], show_progress=False)
    adversarial(out / "bundle", attacks=("fgsm", "pgd-linf"), epsilons=(0, 2 / 255, 8 / 255), steps=2, max_images=40)
    (out / "stress" / "adapt.json").write_text(json.dumps({
        "method": "bn", "source_run": "runs/src", "target": "builtin:shapes?domain=shifted",
        "split": {"adapt": 300, "held_out": 300, "labelled": 0},
        "target_accuracy": {"before": 0.41, "after": 0.83, "after_bundle": 0.83},
        "target_error_reduction": 0.71, "source_accuracy": {"before": 0.97, "after": 0.95}, "forgetting": 0.02}))
    return out


def test_every_stress_file_adds_its_group_and_figures(stressed_run):
    html = write_report(stressed_run).read_text()
    section = html[html.index("<h2>Robustness</h2>"):]
    for title in ("Corruptions and shifts", "Adversarial robustness", "Calibration",
                  "Out-of-distribution detection and selective prediction", "Domain adaptation"):
        assert title in section
    # heatmap, epsilon curves, 2 reliability diagrams, OOD histogram, risk-coverage, adaptation bars
    assert len(PNG_URI.findall(section[:section.index("</section>")] if "</section>" in section else section)) >= 7
    assert "OOD detector AUROC" in section and "Temperature" in section and "Target error cut" in section


def test_section_absent_without_stress_files(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    assert robustness_section(RunFiles(tmp_path)) is None
