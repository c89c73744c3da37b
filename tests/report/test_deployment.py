"""The report's Deployment section: variants, the pick under a budget, hardware utilisation.

The files are written the way their producers write them: ``variants.json`` from
``compress``'s :class:`Variant` records, ``selection.json`` from ``select``'s own
marking and :class:`SelectResult`, ``bench.json`` from a :class:`BenchReport`.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from lensforge.compress.variants import CompressConfig, Variant
from lensforge.deploy.bench import BenchReport, BenchRow, ModelInfo
from lensforge.errors import ArtifactError
from lensforge.report import RunFiles, list_sections, write_report
from lensforge.report.deployment import deployment_section
from lensforge.select import Budget, Option, SelectResult, _mark, pareto_mask
from lensforge.utils.hardware import CpuInfo

from .conftest import CLASS_NAMES, make_run, write_run_json

PNG_URI = re.compile(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"')
REJECTION = "accuracy drop 1.67 points > allowed 1"
REJECTION_HTML = html.escape(REJECTION)  # as the autoescaping template writes it


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _variant(name: str, kind: str, parent: str | None, accuracy: float, p50: float, size_mb: float,
             parent_numbers: tuple[float, float] | None = None, status: str = "accepted", reason: str = "") -> dict:
    latency = {"p50": p50, "p90": p50 * 1.12, "p99": p50 * 1.45, "batch": 1}
    variant = Variant(name, kind, parent, f"/runs/digits/variants/{name}/bundle",
                      {"accuracy": accuracy, "macro_f1": accuracy - 0.002, "ece": 0.021, "num_samples": 540},
                      latency, size_mb, params=301_456, macs=1_950_000, status=status, reason=reason)
    if parent_numbers is not None:
        parent_accuracy, parent_p50 = parent_numbers
        variant.drop_points = (parent_accuracy - accuracy) * 100
        variant.speedup = parent_p50 / p50
    return asdict(variant)


def write_variants(run_dir: Path) -> None:
    """A baseline, a pruned and an int8 variant accepted, and an int8 of the pruned one rejected."""
    config = CompressConfig(prune=0.3, prune_steps=2, quantize=("int8",), max_drop=1.0, finetune_epochs=3)
    variants = [
        _variant("baseline", "baseline", None, 0.9815, 0.142, 1.21, reason="the exported fp32 model"),
        _variant("pruned-30", "pruned", "baseline", 0.9778, 0.095, 0.62, (0.9815, 0.142),
                 reason="1.49x faster than baseline, accuracy change -0.37 points"),
        _variant("int8", "int8", "baseline", 0.9796, 0.081, 0.34, (0.9815, 0.142),
                 reason="1.75x faster than baseline, accuracy change -0.19 points"),
        _variant("pruned-30-int8", "int8", "pruned-30", 0.9611, 0.072, 0.19, (0.9778, 0.095),
                 status="rejected", reason=REJECTION),
    ]
    _write(run_dir / "variants" / "variants.json", {"config": config.model_dump(mode="json"), "variants": variants})


# (candidate, variant, accuracy, p50 ms, size MB, status): four candidates, each with its INT8 variant
MEASURED = [
    ("tinycnn_xs-16px", "baseline", 0.9641, 0.061, 0.29, "accepted"),
    ("tinycnn_xs-16px", "int8", 0.9622, 0.047, 0.09, "accepted"),
    ("tinycnn_s-16px", "baseline", 0.9815, 0.142, 1.21, "accepted"),
    ("tinycnn_s-16px", "int8", 0.9796, 0.081, 0.34, "accepted"),
    ("tinycnn_m-16px", "baseline", 0.9870, 0.412, 4.83, "accepted"),
    ("tinycnn_m-16px", "int8", 0.9703, 0.233, 1.26, "rejected"),
    ("tinycnn_s-8px", "baseline", 0.9407, 0.052, 1.21, "accepted"),
    ("tinycnn_s-8px", "int8", 0.9389, 0.039, 0.34, "accepted"),
]


def selection_json(budget: Budget) -> dict[str, Any]:
    """``selection.json`` as :func:`lensforge.select.select` writes it for ``budget``."""
    options = [Option(candidate, variant, f"/runs/select/candidates/{candidate}/bundle", accuracy, p50, size,
                      status, "accuracy drop 1.67 points > allowed 1" if status == "rejected" else "")
               for candidate, variant, accuracy, p50, size, status in MEASURED]
    chosen = _mark(options, budget)
    return SelectResult(Path("/runs/select"), chosen, options, None).to_json(budget)


def bench_report() -> BenchReport:
    """ONNX Runtime fp32 and int8 and PyTorch at batches 1, 8 and 32 on a 2-vCPU AVX2 machine."""
    cpu = CpuInfo(model_name="AMD EPYC 7B13 64-Core Processor", vendor="AuthenticAMD", logical_cores=2,
                  physical_cores=1, usable_cores=2, peak_cores=1, isa=("sse4_2", "avx", "fma", "f16c", "avx2"),
                  clock_ghz=2.45, clock_source="/proc/cpuinfo cpu MHz", fp32_flops_per_cycle_per_core=32,
                  int8_ops_per_cycle_per_core=42, peak_gflops_fp32=78.4, peak_gops_int8=102.9,
                  notes=("2 usable CPUs are 1 physical cores (SMT siblings share vector units): the peak counts 1",))
    flops = 4_200_000
    model = ModelInfo("tinycnn_s", (1, 16, 16), 1.21, 1.23, 301_456, flops, flops // 2, "torch.utils.flop_counter")
    rows = []
    for backend, precision, p50_by_batch in (
            ("torch", "fp32", {1: 0.41, 8: 0.98, 32: 2.9}),
            ("onnxruntime", "fp32", {1: 0.142, 8: 0.61, 32: 2.1}),
            ("onnxruntime", "int8", {1: 0.081, 8: 0.39, 32: 1.35})):
        peak = cpu.peak_gops_int8 if precision == "int8" else cpu.peak_gflops_fp32
        for batch, p50 in p50_by_batch.items():
            gflops = flops * batch / (p50 / 1e3) / 1e9
            rows.append(BenchRow(backend, precision, batch, 2, p50, p50 * 1.1, p50 * 1.6, p50 * 1.05,
                                 batch / p50 * 1e3, 300, 412.0, 35.0, gflops, gflops / peak,
                                 None if backend == "torch" else 2.1e-6))
    return BenchReport("runs/digits", cpu, model, rows, "torch",
                       notes=["timing on a shared machine varies up to 2x"],
                       versions={"onnxruntime": "1.19.2", "torch": "2.4.1", "openvino": None})


def deployment_html(run_dir: Path) -> str:
    """The Deployment section's HTML in the report written for ``run_dir`` (empty if absent)."""
    page = write_report(run_dir, strict=True).read_text(encoding="utf-8")
    match = re.search(r'<section id="deployment">.*?</section>', page, re.DOTALL)
    return match.group(0) if match else ""


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder with just ``run.json`` (the header), for the deployment files to go in."""
    write_run_json(tmp_path, CLASS_NAMES)
    return tmp_path


def test_all_three_files_give_tables_the_pareto_plot_and_the_utilisation_plot(run_dir: Path) -> None:
    write_variants(run_dir)
    _write(run_dir / "selection.json", selection_json(Budget(max_latency_ms=0.1, max_size_mb=0.5)))
    bench_report().write_json(run_dir / "bench.json")
    section = deployment_html(run_dir)
    assert "<h2>Deployment</h2>" in section
    for name in ("pruned-30", "pruned-30-int8", "tinycnn_m-16px"):
        assert f">{name}<" in section
    assert "✗ rejected" in section and "✓ accepted" in section
    assert f"<li>pruned-30-int8 (int8 of pruned-30): {REJECTION_HTML}</li>" in section
    assert "pruned 30% of the channels in 2 steps" in section and "at most 1 accuracy point lost" in section
    # the selection's plot already holds this run's variants: one Pareto plot, one utilisation plot
    assert len(PNG_URI.findall(section)) == 2
    assert ("Picked tinycnn_s-16px/int8: 98.0% at 0.081 ms p50, 0.34 MB — the most accurate of the "
            "4 artifacts that meet ≤ 0.1 ms and ≤ 0.5 MB (8 artifacts measured).") in section
    assert "tinycnn_s-16px/baseline (98.2%) is more accurate but exceeds the budget: p50 0.142 ms &gt; 0.1 ms, " \
           "1.21 MB &gt; 0.5 MB" in section
    assert "AMD EPYC 7B13 64-Core Processor" in section and "avx2" in section and "2.45 GHz" in section
    assert "onnxruntime 1.19.2" in section


def test_options_table_is_sorted_by_accuracy_with_the_pick_highlighted(run_dir: Path) -> None:
    _write(run_dir / "selection.json", selection_json(Budget(max_latency_ms=0.1, max_size_mb=0.5)))
    section = deployment_html(run_dir)
    table = section[section.index("Every measured artifact, most accurate first"):]
    rows = re.findall(r"<tr( class=\"highlight\")?>\s*<td class=\"mono\">([^<]+)</td><td class=\"mono\">([^<]+)<",
                      table)
    ranked = sorted(MEASURED, key=lambda m: -m[2])
    assert [(candidate, variant) for _, candidate, variant in rows] == [(m[0], m[1]) for m in ranked]
    assert [f"{c}/{v}" for marked, c, v in rows if marked] == ["tinycnn_s-16px/int8"]
    assert len(PNG_URI.findall(section)) == 1


def test_unmet_budget_says_which_limit_failed(run_dir: Path) -> None:
    _write(run_dir / "selection.json", selection_json(Budget(max_latency_ms=0.02, max_size_mb=0.05)))
    section = deployment_html(run_dir)
    assert "No artifact meets the budget" in section and "tone-bad" in section
    assert "None of the 8 measured artifacts meets ≤ 0.02 ms and ≤ 0.05 MB" in section
    assert "latency: the fastest artifact (tinycnn_s-8px/int8) takes 0.039 ms &gt; 0.02 ms (1.95x over)" in section
    assert "size: the smallest artifact (tinycnn_xs-16px/int8) is 0.09 MB &gt; 0.05 MB (1.80x over)" in section
    assert "Picked" not in section and len(PNG_URI.findall(section)) == 1


def test_variants_alone_get_their_own_tradeoff_plot(run_dir: Path) -> None:
    write_variants(run_dir)
    section = deployment_html(run_dir)
    assert len(PNG_URI.findall(section)) == 1
    assert "Pick under the budget" not in section and "Hardware utilisation" not in section
    assert "highlighted: rejected by the guard, reasons below" in section
    assert "1.75×" in section and "-0.19" in section  # the int8 variant against its parent
    highlighted = re.findall(r'<tr class="highlight">\s*<td class="mono">([^<]+)<', section)
    assert highlighted == ["pruned-30-int8"]  # the rejected row


def test_bench_alone_gives_the_utilisation_plot_and_latency_table(run_dir: Path) -> None:
    bench_report().write_json(run_dir / "bench.json")
    section = deployment_html(run_dir)
    assert "Hardware utilisation" in section and len(PNG_URI.findall(section)) == 1
    assert section.count("<td>onnxruntime</td>") == 6 and section.count("<td>torch</td>") == 3
    assert "103 GOP/s int8" in section and "1 physical core counted" in section


def test_section_is_absent_without_its_files(tmp_path: Path, run_dir: Path) -> None:
    full = make_run(tmp_path / "full", CLASS_NAMES)  # every other file a run holds
    assert deployment_section(RunFiles(full)) is None
    assert deployment_html(run_dir) == "" and "<section id=\"summary\">" in (run_dir / "report.html").read_text()
    names = [spec.name for spec in list_sections()]
    assert names.index("evaluation") < names.index("deployment") < names.index("bundle")


def test_malformed_bench_file_is_named(run_dir: Path) -> None:
    report = bench_report().to_dict()
    del report["cpu"]
    _write(run_dir / "bench.json", report)
    with pytest.raises(ArtifactError, match="bench.json: 'cpu' is not a lensforge CPU description"):
        write_report(run_dir, strict=True)
    assert "This section could not be built" in write_report(run_dir).read_text(encoding="utf-8")


def test_pareto_mask_keeps_points_no_other_beats_on_all_three() -> None:
    accuracy = [0.98, 0.97, 0.96, 0.97, None]
    latency = [1.0, 0.5, 0.6, 0.5, 0.1]
    size = [2.0, 1.0, 1.0, 0.5, 0.1]
    # 0.96 is slower and no smaller than a more accurate point; the missing accuracy counts as worst
    # but its speed and size are unbeaten, so it stays
    assert pareto_mask(accuracy, latency, size) == [True, False, False, True, True]


def test_deployment_section_does_not_import_torch(run_dir: Path) -> None:
    write_variants(run_dir)
    _write(run_dir / "selection.json", selection_json(Budget(max_latency_ms=0.02)))
    bench_report().write_json(run_dir / "bench.json")
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
            "from lensforge.report import write_report\n"
            f"html = write_report({str(run_dir)!r}, strict=True).read_text()\n"
            "assert 'No artifact meets the budget' in html\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
