"""``benchmark()`` on a real run folder and real bundles: structure, FLOPs, agreement, notes, bad input.

Timing never decides a test here: only the order of percentiles and positivity are checked.
"""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from helpers import require_extra
from onnx import TensorProto, helper

from lensforge.data.preprocess import Preprocess
from lensforge.deploy.bench import (
    BenchReport,
    PeakRss,
    Timing,
    benchmark,
    count_onnx_flops,
    count_torch_flops,
    onnx_parameter_count,
    parse_batches,
    time_calls,
)
from lensforge.deploy.export import write_bundle
from lensforge.errors import ArtifactError, UsageError
from lensforge.models import create_model
from lensforge.train import load_run

FAST = {"threads": 1, "warmup": 2, "min_iters": 3, "min_seconds": 0.02, "max_seconds": 2.0}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A bare tinycnn_xs bundle (3 classes, 16x16 RGB) and the model it came from."""
    torch.manual_seed(0)
    model = create_model("tinycnn_xs", num_classes=3).eval()
    pre = Preprocess(input_size=(16, 16))
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 16, 16), dtype=np.uint8)
    path = write_bundle(model, pre, ["a", "b", "c"], tmp_path_factory.mktemp("bare") / "bundle",
                        model_name="tinycnn_xs", sample_images=images)  # fmt: skip
    return path, model


@pytest.fixture(scope="module")
def tiny_run(digits_run):
    """A real trained run folder (digits, 8x8) with its exported bundle: the session's shared one, copied."""
    return digits_run


@pytest.fixture(scope="module")
def run_report(tiny_run):
    return benchmark(tiny_run, backends=("torch", "onnxruntime"), batches=(4, 1), **FAST)


def test_run_folder_benchmarks_torch_and_onnxruntime(run_report, tiny_run):
    report = run_report
    assert [(r.backend, r.batch) for r in report.rows] == [
        ("torch", 1), ("torch", 4), ("onnxruntime", 1), ("onnxruntime", 4)
    ]  # fmt: skip
    assert report.reference_backend == "torch" and report.target == str(tiny_run)
    for row in report.rows:
        assert row.precision == "fp32" and row.threads == 1 and row.iterations >= 3
        assert 0 < row.latency_p50_ms <= row.latency_p90_ms <= row.latency_p99_ms
        assert row.latency_mean_ms > 0 and row.throughput_ips > 0
        assert row.throughput_ips == pytest.approx(row.batch * 1000 / row.latency_mean_ms)
        assert row.gflops == pytest.approx(report.model.flops_per_image * row.throughput_ips / 1e9)
        if report.cpu.peak_gflops_fp32:
            assert row.utilisation == pytest.approx(row.gflops / report.cpu.peak_gflops_fp32)
        if sys.platform == "linux":
            assert row.peak_rss_mb > 0 and row.rss_increase_mb >= 0
    # same inputs, same model: the exported graph reproduces PyTorch's logits
    for row in report.rows:
        assert row.max_abs_diff_vs_reference < 1e-4
    assert report.speedup("onnxruntime", "torch", 1) == pytest.approx(
        report.row("torch", 1).latency_p50_ms / report.row("onnxruntime", 1).latency_p50_ms
    )
    assert set(report.versions) >= {"python", "lensforge", "numpy", "torch", "onnxruntime"}


def test_model_info_from_the_run(run_report, tiny_run):
    model, run = run_report.model, load_run(tiny_run)
    assert model.name == "tinycnn_xs" and model.input_shape == (1, 8, 8)
    assert model.params == sum(p.numel() for p in run.model.parameters())
    assert model.flops_source == "torch.utils.flop_counter"
    assert model.flops_per_image == count_torch_flops(run.model, (1, 8, 8)) > 0
    assert model.macs_per_image == model.flops_per_image // 2
    assert model.size_mb == pytest.approx((tiny_run / "bundle" / "model.onnx").stat().st_size / 2**20)
    assert model.weights_size_mb == pytest.approx((tiny_run / "model.safetensors").stat().st_size / 2**20)


def test_json_round_trip_and_table(run_report, tmp_path):
    again = BenchReport.from_json(run_report.to_json())
    assert again == run_report
    path = run_report.write_json(tmp_path / "bench.json")
    assert BenchReport.from_dict(json.loads(path.read_text())) == run_report
    table = run_report.table()
    assert table.row_count == len(run_report.rows) and len(table.columns) == 12
    with pytest.raises(UsageError, match="no benchmark row for openvino at batch 1"):
        run_report.speedup("openvino", "torch", 1)


def test_bare_bundle_skips_torch_and_counts_flops_from_the_graph(tiny_bundle):
    path, model = tiny_bundle
    report = benchmark(path, backends=("torch", "onnxruntime"), batches=(2,), **FAST)
    assert [(r.backend, r.batch) for r in report.rows] == [("onnxruntime", 2)]
    assert report.reference_backend == "onnxruntime" and report.rows[0].max_abs_diff_vs_reference == 0.0
    assert any("no PyTorch model for a bare bundle" in note for note in report.notes)
    assert report.model.flops_source == "onnx graph" and report.model.weights_size_mb is None
    # the ONNX graph count agrees with torch's counter on the model it was exported from
    assert report.model.flops_per_image == count_torch_flops(model, (3, 16, 16))
    assert report.model.params == onnx_parameter_count(path / "model.onnx") > 0


def test_bundle_inside_a_run_folder_gets_torch(tiny_run):
    report = benchmark(tiny_run / "bundle", backends=("onnxruntime", "torch"), batches=(1,), **FAST)
    assert [r.backend for r in report.rows] == ["onnxruntime", "torch"]
    assert report.reference_backend == "onnxruntime" and report.rows[1].max_abs_diff_vs_reference < 1e-4


def test_run_without_bundle_skips_onnx_backends(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("bundle", "checkpoints"))
    report = benchmark(run, backends=("torch", "onnxruntime"), batches=(1,), **FAST)
    assert [r.backend for r in report.rows] == ["torch"] and report.model.size_mb is None
    assert any("onnxruntime skipped" in note and "lensforge export" in note for note in report.notes)
    with pytest.raises(UsageError, match="nothing to benchmark"):
        benchmark(run, backends=("onnxruntime",), batches=(1,), **FAST)


def test_manifest_precision_and_flops_are_used(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle[0], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(precision="int8", flops_per_image=123_456_000)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = benchmark(bundle, backends=("onnxruntime",), batches=(1,), **FAST)
    row = report.rows[0]
    assert row.precision == "int8" and report.model.flops_source == "manifest"
    assert report.model.flops_per_image == 123_456_000 and report.model.macs_per_image == 61_728_000
    if report.cpu.peak_gops_int8:
        assert row.utilisation == pytest.approx(row.gflops / report.cpu.peak_gops_int8)


def test_one_conv_flops_match_the_formula():
    cin, cout, k, h, w = 3, 8, 3, 12, 10
    conv = torch.nn.Conv2d(cin, cout, k, padding=1, bias=False)
    expected = 2 * cin * cout * k * k * h * w  # 'same' padding: output is h x w
    assert count_torch_flops(conv, (cin, h, w)) == expected
    # the ONNX counter on the same layer (+ a Gemm head: 2 x in x out), batch dim left dynamic
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Flatten", ["y"], ["flat"]),
         helper.make_node("Gemm", ["flat", "G"], ["logits"], transB=1)],
        "one_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", cin, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor("W", TensorProto.FLOAT, [cout, cin, k, k], np.zeros(cout * cin * k * k)),
         helper.make_tensor("G", TensorProto.FLOAT, [5, cout * h * w], np.zeros(5 * cout * h * w))],
    )  # fmt: skip
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert count_onnx_flops(path) == expected + 2 * cout * h * w * 5
    assert onnx_parameter_count(path) == cout * cin * k * k + 5 * cout * h * w


def _save(model: onnx.ModelProto):
    import tempfile

    fd, name = tempfile.mkstemp(suffix=".onnx")
    with open(fd, "wb") as f:
        f.write(model.SerializeToString())
    return name


def test_time_calls_warms_up_then_times_at_least_min_iters():
    calls = []
    first, latencies = time_calls(lambda: calls.append(1) or len(calls), Timing(4, 7, 0.0, 60.0))
    assert first == 1 and len(calls) == 4 + 7  # 4 warm-up calls (the first untimed one included)
    assert len(latencies) == 7 and (latencies >= 0).all()
    _, capped = time_calls(lambda: None, Timing(0, 10**9, 0.0, 0.01))
    assert 1 <= len(capped) < 10**9  # max_seconds ends it


def test_peak_rss_sees_a_temporary_allocation():
    memory = PeakRss()
    if not memory.supported:
        pytest.skip("no /proc/self/clear_refs here")
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MB, every page touched
    del block
    assert memory.peak_mb() - memory.before_mb >= 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backends": ("onnxruntim",)}, "unknown backend 'onnxruntim'; did you mean onnxruntime"),
        ({"backends": ("tensorrt",)}, "choose from onnxruntime, openvino, torch"),
        ({"backends": ()}, "no backend given"),
        ({"batches": (0,)}, "from 1 to 4096, not 0"),
        ({"batches": (5000,)}, "from 1 to 4096, not 5000"),
        ({"batches": (1.5,)}, "not 1.5"),
        ({"batches": (True,)}, "not True"),
        ({"batches": ()}, "no batch size"),
        ({"threads": 0}, "--threads must be a whole number >= 1, not 0"),
        ({"min_iters": 0}, "min_iters"),
        ({"min_seconds": 5.0, "max_seconds": 1.0}, "below min_seconds"),
    ],
)
def test_bad_options_are_usage_errors(tiny_bundle, kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        benchmark(tiny_bundle[0], **kwargs)


def test_bad_targets(tiny_bundle, tmp_path):
    with pytest.raises(UsageError, match="no such file or folder"):
        benchmark(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="neither a run folder .* nor a bundle"):
        benchmark(tmp_path / "empty")
    altered = shutil.copytree(tiny_bundle[0], tmp_path / "altered")
    with open(altered / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="altered or damaged"):
        benchmark(altered, backends=("onnxruntime",))
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ArtifactError, match="format is 'other'"):
        benchmark(tmp_path / "fake")


def test_parse_batches():
    assert parse_batches("1,8, 32") == (1, 8, 32)
    with pytest.raises(UsageError, match="comma-separated"):
        parse_batches("1,eight")


def test_missing_openvino_is_a_usage_error_with_the_install_hint(tiny_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    with pytest.raises(UsageError, match=r"OpenVINO is not installed: pip install 'lensforge\[openvino\]'"):
        benchmark(tiny_bundle[0], backends=("openvino",), batches=(1,), **FAST)


def test_openvino_matches_onnxruntime(tiny_bundle):
    require_extra("openvino", "openvino")
    report = benchmark(tiny_bundle[0], backends=("onnxruntime", "openvino"), batches=(1, 3), **FAST)
    rows = [r for r in report.rows if r.backend == "openvino"]
    assert [r.batch for r in rows] == [1, 3] and all(r.precision == "fp32" for r in rows)
    # f32 inference precision set explicitly: bf16 would differ by ~1e-3 or more
    assert all(r.max_abs_diff_vs_reference < 1e-4 for r in rows)
    assert all(r.throughput_ips > 0 and math.isfinite(r.latency_p99_ms) for r in rows)
    assert report.versions["openvino"]
