"""CLI tables read well in an 80-column terminal, and `lensforge list` covers every listed registry."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
from helpers import LENSFORGE
from rich.console import Console

from lensforge.cli import Kind, guard_table, stress_table, variants_table
from lensforge.compress.variants import Variant
from lensforge.registry import Registry

WIDTH = 80


def _render(*renderables: object) -> list[str]:
    console = Console(width=WIDTH, record=True, force_terminal=False, color_system=None)
    for renderable in renderables:
        console.print(renderable)
    return console.export_text().splitlines()


def _fits(lines: list[str]) -> None:
    too_wide = [line for line in lines if len(line) > WIDTH]
    assert not too_wide, too_wide


def test_variants_table_puts_long_reasons_under_the_table():
    reason = "not clearly faster than its parent: 1.01x at batch 1 (needs 1.05x), after a longer pair-wise retiming"
    variants = [
        Variant("baseline", "baseline", None, "b", {"accuracy": 0.95}, {"p50": 0.21, "p99": 0.4}, 2.2),
        Variant("pruned-50-kd", "pruned", "baseline", "p", {"accuracy": 0.94}, {"p50": 0.2, "p99": 0.3}, 0.6,
                speedup=1.01, drop_points=1.0, status="rejected", reason=reason),
        Variant("int8", "int8", "baseline", "q", {"accuracy": 0.951}, {"p50": 0.1, "p99": 0.2}, 0.6,
                speedup=2.1, drop_points=-0.1),
    ]
    table, reasons = variants_table(variants)
    lines = _render(table, *reasons)
    _fits(lines)
    rows = [line for line in lines if line.startswith("│")]
    assert len(rows) == 3, lines  # one line per variant: nothing wraps inside the table
    assert any("not clearly faster than its parent" in line for line in lines[-3:])


def test_stress_table_fits_with_all_five_severities():
    corruptions = {name: {"family": "weather", "accuracy": {str(s): 0.5 for s in range(1, 6)}, "error_mean": 0.5}
                   for name in ("gaussian_noise", "jpeg_compression", "perspective", "color_temperature")}
    summary = {"target": "runs/a-rather-long-run-name/variants/int8/bundle", "num_images": 1000, "split": "test",
               "data": "builtin:shapes?n=5000&size=32&domain=shifted", "clean_accuracy": 0.9,
               "severities": [1, 2, 3, 4, 5], "corruptions": corruptions, "mean_corruption_error": 0.5,
               "mce": 0.9, "relative_mce": 1.1, "reference": {"target": "runs/reference"},
               "compare": [{"precision": "int8", "target": "runs/x/variants/int8/bundle",
                            "gap": {"mean_points": -1.2, "clean_points": -0.2, "worst": "fog"}}],
               "stability": {"target": {"translate_flip_rate": 0.1, "jitter_flip_rate": 0.02}}}
    table, lines = stress_table(summary)
    rendered = _render(table)
    _fits(rendered)
    assert len([line for line in rendered if line.startswith("│")]) == len(corruptions)
    assert any(line.startswith("mCE") for line in lines)


def test_guard_table_is_one_row_per_detector():
    sets = ("other_source", "uniform_noise", "gaussian_noise", "textures", "corrupted")
    detectors = {name: {"auroc": {s: 0.9 for s in sets}, "fpr95": {s: 0.3 for s in sets}, "mean_auroc": 0.9}
                 for name in ("msp", "energy", "mahalanobis", "vim", "knn")}
    detectors["knn"]["auroc"]["corrupted"] = 0.61
    lines = _render(guard_table({"split": "val", "data": "builtin:shapes?n=5000&size=32", "detectors": detectors,
                                 "chosen": "mahalanobis"}))
    _fits(lines)
    rows = [line for line in lines if line.startswith("│")]
    assert len(rows) == 5 and any("corrupted (0.610)" in row for row in rows)


def test_every_listed_registry_has_a_list_command():
    import lensforge.data.sources  # noqa: F401  (importing fills the registries)
    import lensforge.deploy.bench  # noqa: F401
    import lensforge.deploy.guardrails  # noqa: F401
    import lensforge.models  # noqa: F401
    import lensforge.ops.attacks  # noqa: F401
    import lensforge.ops.corruptions  # noqa: F401
    import lensforge.report  # noqa: F401
    import lensforge.stress.adapt  # noqa: F401
    import lensforge.stress.ood  # noqa: F401
    import lensforge.tasks  # noqa: F401
    import lensforge.train.augment  # noqa: F401

    with warnings.catch_warnings():  # touching every object trips deprecation shims of other libraries
        warnings.simplefilter("ignore")
        registries = [obj for obj in gc.get_objects() if isinstance(obj, Registry)]
    assert len(registries) >= 10
    kinds = {kind.value for kind in Kind}
    unlisted = [r.kind for r in registries if r.listed and f"{r.kind}s" not in kinds]
    assert not unlisted, f"errors point to `lensforge list <kind>s` for these, which does not exist: {unlisted}"


@pytest.mark.slow
def test_list_backends_names_versions_at_80_columns():
    import subprocess

    result = subprocess.run([LENSFORGE, "list", "backends"], capture_output=True, text=True, check=False,
                            env={**os.environ, "COLUMNS": str(WIDTH)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    _fits(lines)
    from importlib import metadata

    onnxruntime = next(line for line in lines if "onnxruntime" in line)
    assert "yes" in onnxruntime and metadata.version("onnxruntime") in onnxruntime
    assert any("openvino" in line for line in lines) and any("torch" in line for line in lines)
