"""Post-training quantization through ONNX Runtime, on a real trained digits bundle (16 px, CPU, seconds)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from lensforge.compress import quantize as quantize_module
from lensforge.compress.quantize import (
    QuantizeResult,
    convert_fp16,
    input_preprocessing_nodes,
    quantize_guarded,
    quantize_int8,
    rank_sensitive_nodes,
)
from lensforge.deploy import bundle as bundle_module
from lensforge.deploy.bundle import MODEL_FILE, Bundle, derive_bundle, load_bundle
from lensforge.errors import ArtifactError, ExportError, UsageError


@dataclass
class Trained:
    bundle: Path
    calibration: np.ndarray  # uint8 training images
    test_images: np.ndarray
    test_targets: np.ndarray
    accuracy: float  # fp32 bundle on the test split, through ONNX Runtime


def accuracy(bundle: Path | Bundle, images: np.ndarray, targets: np.ndarray) -> float:
    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, intra_op_num_threads=2)
    logits, _ = loaded.predict_uint8(images)
    return float(np.mean(logits.argmax(1) == targets))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from lensforge.deploy.from_run import export_run
    from lensforge.train import resolve_config, train

    out = tmp_path_factory.mktemp("quantize") / "run"
    cfg = resolve_config(None, data="builtin:digits", model="tinycnn_s", image_size=16, epochs=3, out=str(out))
    res = train(cfg, show_progress=False)
    bundle = export_run(res.run_dir)
    test_images, test_targets = res.table.images[res.splits.test], res.table.targets[res.splits.test]
    return Trained(bundle, res.table.images[res.splits.train[:200]], test_images, test_targets,
                   accuracy(bundle, test_images, test_targets))


@pytest.fixture(scope="module")
def int8_bundle(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_int8(trained.bundle, tmp_path_factory.mktemp("int8") / "bundle", trained.calibration)


def graph(bundle: Path) -> onnx.GraphProto:
    return onnx.load(str(bundle / MODEL_FILE)).graph


def test_int8_bundle_loads_and_describes_its_quantization(trained, int8_bundle):
    loaded = load_bundle(int8_bundle)  # verifies every file hash
    manifest = loaded.manifest
    assert manifest["precision"] == "int8"
    assert manifest["quantization"] == {
        "method": "minmax", "per_channel": True, "activation_type": "uint8", "weight_type": "int8",
        "reduce_range": False, "excluded_nodes": [], "op_types": None, "calibration_images": 200,
    }  # fmt: skip
    parent = load_bundle(trained.bundle).manifest
    assert manifest["parent"]["model_sha256"] == parent["files"][MODEL_FILE]["sha256"]
    assert Path(manifest["parent"]["path"]) == trained.bundle.resolve()
    assert manifest["metrics"] == {}  # the parent's numbers described the fp32 model
    assert manifest["parity"]["reference"] == "parent" and manifest["parity"]["top1_agreement"] > 0.95
    assert manifest["class_names"] == parent["class_names"] and manifest["preprocess"] == parent["preprocess"]


def test_int8_graph_really_is_quantized_with_uint8_input_and_float_outputs(trained, int8_bundle):
    g = graph(int8_bundle)
    ops = [node.op_type for node in g.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10
    int8_weights = [i for i in g.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8_weights) >= 5  # conv weights stored as int8
    float_weights = [i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4]
    assert float_weights == ["normalize.scale", "normalize.shift"]  # only the per-channel normalisation
    float32 = onnx.TensorProto.FLOAT
    assert [(i.name, i.type.tensor_type.elem_type) for i in g.input] == [("input", onnx.TensorProto.UINT8)]
    assert load_bundle(int8_bundle).input_dtype == load_bundle(trained.bundle).input_dtype == "uint8"
    # the normalisation of the pixels stays float (no DequantizeLinear between its nodes) and
    # hands the first layer normalised values, which are quantized for it
    head = input_preprocessing_nodes(int8_bundle / MODEL_FILE)
    assert head == input_preprocessing_nodes(trained.bundle / MODEL_FILE)
    nodes = {node.name: node for node in g.node}
    assert [nodes[name].op_type for name in head] == ["Cast", "Mul", "Add"]
    assert [node.op_type for node in g.node if nodes[head[-1]].output[0] in node.input] == ["QuantizeLinear"]
    assert {(o.name, o.type.tensor_type.elem_type) for o in g.output} == {("logits", float32), ("features", float32)}
    producers = {out: node.op_type for node in g.node for out in node.output}
    # outputs leave the model unrounded: not the 8-bit copy a DequantizeLinear would give
    assert producers["logits"] == "Gemm" and producers["features"] == "Reshape"


def test_int8_keeps_accuracy_and_shrinks_the_file(trained, int8_bundle):
    int8_accuracy = accuracy(int8_bundle, trained.test_images, trained.test_targets)
    assert abs(int8_accuracy - trained.accuracy) <= 0.01
    assert (int8_bundle / MODEL_FILE).stat().st_size < 0.4 * (trained.bundle / MODEL_FILE).stat().st_size


def test_fp16_bundle_agrees_with_fp32(trained, tmp_path):
    out = convert_fp16(trained.bundle, tmp_path / "fp16", sample_images=trained.calibration[:32])
    loaded = load_bundle(out)
    assert loaded.manifest["precision"] == "fp16"
    assert loaded.manifest["parity"]["n_images"] == 32
    g = graph(out)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 and len(i.dims) == 4 for i in g.initializer)
    assert [i.type.tensor_type.elem_type for i in g.input] == [onnx.TensorProto.UINT8]  # pixels in, as the parent
    assert {o.type.tensor_type.elem_type for o in g.output} == {onnx.TensorProto.FLOAT}
    assert loaded.input_dtype == "uint8" and loaded.manifest["quantization"]["input_dtype"] == "uint8"
    reference, _ = load_bundle(trained.bundle).predict_uint8(trained.test_images)
    half, _ = loaded.predict_uint8(trained.test_images)
    assert np.mean(reference.argmax(1) == half.argmax(1)) > 0.98
    assert (out / MODEL_FILE).stat().st_size < 0.6 * (trained.bundle / MODEL_FILE).stat().st_size


def _conv_weight_sources(g: onnx.GraphProto) -> dict[str, str]:
    """{conv node name: op type (or "initializer") its weight comes from}."""
    producers = {out: node.op_type for node in g.node for out in node.output}
    return {node.name: producers.get(node.input[1], "initializer") for node in g.node if node.op_type == "Conv"}


def test_excluded_nodes_stay_float(trained, int8_bundle, tmp_path):
    first, second = list(_conv_weight_sources(graph(int8_bundle)))[:2]
    out = quantize_int8(trained.bundle, tmp_path / "int8", trained.calibration, exclude_nodes=[first])
    sources = _conv_weight_sources(graph(out))
    assert sources[first] == "initializer"  # float weights, float Conv
    assert sources[second] == "DequantizeLinear"  # the rest still quantized
    assert load_bundle(out).manifest["quantization"]["excluded_nodes"] == [first]


def test_unknown_excluded_node_is_a_usage_error_with_a_suggestion(trained, int8_bundle, tmp_path):
    name = next(iter(_conv_weight_sources(graph(int8_bundle))))
    with pytest.raises(UsageError, match=f"no node named '{name}x'.*did you mean {name}"):
        quantize_int8(trained.bundle, tmp_path / "int8", trained.calibration, exclude_nodes=[name + "x"])
    assert not (tmp_path / "int8").exists()


def test_rank_sensitive_nodes_names_quantized_nodes_of_both_graphs(trained, int8_bundle):
    ranked = rank_sensitive_nodes(trained.bundle, int8_bundle, trained.calibration)
    names = [name for name, _ in ranked]
    losses = [loss for _, loss in ranked]
    assert losses == sorted(losses, reverse=True) and all(np.isfinite(losses))
    assert set(_conv_weight_sources(graph(int8_bundle))) <= set(names)  # every conv is ranked
    assert set(names) <= {node.name for node in graph(trained.bundle).node}
    assert set(names) <= {node.name for node in graph(int8_bundle).node}
    # ranking a bundle or its model file is the same
    assert [n for n, _ in rank_sensitive_nodes(trained.bundle, int8_bundle / MODEL_FILE, trained.calibration)] == names


def _evaluator(trained: Trained, seen: list[Path]):
    def evaluate(path: Path) -> float:
        seen.append(path)
        return accuracy(path, trained.test_images, trained.test_targets)

    return evaluate


def test_guarded_accepts_the_first_attempt_within_a_generous_allowance(trained, tmp_path):
    seen: list[Path] = []
    result = quantize_guarded(trained.bundle, tmp_path / "int8", trained.calibration, _evaluator(trained, seen),
                              max_drop_points=5.0, reference_accuracy=trained.accuracy)  # fmt: skip
    assert isinstance(result, QuantizeResult)
    assert result.accepted and result.bundle == tmp_path / "int8"
    assert len(result.attempts) == 1 and result.attempts[0]["method"] == "minmax"
    assert result.attempts[0]["excluded_nodes"] == [] and result.drop_points <= 5.0
    assert "accepted at attempt 1" in result.reason
    guard = load_bundle(result.bundle).manifest["quantization"]["guard"]
    assert guard["accepted"] is True and guard["kept_attempt"] == 1
    assert not seen[0].exists()  # attempts were temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]


def test_guarded_gives_up_with_the_numbers_when_nothing_can_pass(trained, tmp_path):
    seen: list[Path] = []
    result = quantize_guarded(trained.bundle, tmp_path / "int8", trained.calibration, _evaluator(trained, seen),
                              max_drop_points=-1.0, reference_accuracy=trained.accuracy, max_attempts=4)  # fmt: skip
    assert not result.accepted
    methods = [a["method"] for a in result.attempts]
    excluded = [len(a["excluded_nodes"]) for a in result.attempts]
    assert methods[:2] == ["minmax", "percentile"] and excluded == [0, 0, 1, 3]
    assert all("error" not in a and a["drop_points"] > -1.0 for a in result.attempts)
    assert result.reason.startswith("rejected") and f"{trained.accuracy:.2%}" in result.reason
    # the best attempt is still there, marked rejected, for the report
    best = max(a["accuracy"] for a in result.attempts)
    assert result.accuracy == best and result.bundle is not None
    manifest = load_bundle(result.bundle).manifest
    assert manifest["quantization"]["guard"]["accepted"] is False
    assert len(manifest["quantization"]["guard"]["attempts"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x: np.repeat(x, 3, axis=1), r"shape \(N, 1, 16, 16\).*got \(8, 3, 16, 16\)"),
        (lambda x: x[:, :, :8, :8], r"shape \(N, 1, 16, 16\).*got \(8, 1, 8, 8\)"),
        (lambda x: x[0], r"shape \(N, 1, 16, 16\).*got \(1, 16, 16\)"),
        (lambda x: x.astype(np.float32), r"uint8 array of shape \(N, 1, 16, 16\), not float32"),
    ],
)
def test_wrong_calibration_images_fail_before_any_work(trained, tmp_path, monkeypatch, change, message):
    def never(*args, **kwargs):
        raise AssertionError("prepared a model despite bad calibration images")

    monkeypatch.setattr(quantize_module, "prepare_for_quantization", never)
    bad = change(trained.calibration[:8])
    with pytest.raises(UsageError, match=message):
        quantize_int8(trained.bundle, tmp_path / "int8", bad)
    with pytest.raises(UsageError, match=message):
        quantize_guarded(trained.bundle, tmp_path / "guarded", bad, lambda p: 1.0,
                         max_drop_points=1.0, reference_accuracy=0.9)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def _activation_scales(bundle: Path) -> dict[str, float]:
    return {
        i.name: float(onnx.numpy_helper.to_array(i).ravel()[0])
        for i in graph(bundle).initializer
        if i.name.endswith("_scale") and "weight" not in i.name
    }


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_each_calibration_method_really_calibrates_differently(trained, int8_bundle, tmp_path, method):
    out = quantize_int8(trained.bundle, tmp_path / method, trained.calibration[:64], method=method)
    assert load_bundle(out).manifest["quantization"]["method"] == method
    minmax, other = _activation_scales(int8_bundle), _activation_scales(out)
    assert minmax.keys() == other.keys()
    # both clip outliers that MinMax keeps: narrower ranges on most activations
    narrower = [name for name in minmax if other[name] < 0.98 * minmax[name]]
    assert len(narrower) > len(minmax) / 2


def test_unknown_calibration_method_is_a_usage_error(trained, tmp_path):
    with pytest.raises(UsageError, match="unknown calibration method 'min-max'.*'minmax'"):
        quantize_int8(trained.bundle, tmp_path / "int8", trained.calibration, method="min-max")


def _break_outputs(model: onnx.ModelProto) -> None:
    """A quantized model that lost its outputs."""
    del model.graph.output[:]
    model.graph.output.extend([onnx.helper.make_tensor_value_info("other", onnx.TensorProto.FLOAT, None)])


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize(
    ("where", "replacement", "error"),
    [
        (quantize_module, ("keep_outputs_float", _break_outputs), ExportError),  # before the bundle is written
        (bundle_module, ("bundle_file_hashes", _disk_full), OSError),  # model written, manifest not yet
    ],
)
def test_a_failure_midway_leaves_no_half_written_bundle(trained, int8_bundle, tmp_path, monkeypatch, where,
                                                        replacement, error):  # fmt: skip
    out = tmp_path / "int8"
    shutil.copytree(int8_bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(where, *replacement)
    with pytest.raises(error):
        quantize_int8(trained.bundle, out, trained.calibration)
    with pytest.raises(error):
        quantize_int8(trained.bundle, tmp_path / "fresh", trained.calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # no temp folder, no "fresh"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old bundle is untouched
    monkeypatch.undo()
    load_bundle(out)


def test_derive_bundle_copies_companion_files_and_refuses_to_replace_its_parent(trained, tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(trained.bundle, parent)
    (parent / "ood").mkdir()
    (parent / "ood" / "stats.json").write_text('{"threshold": 1.5}')
    manifest = json.loads((parent / "manifest.json").read_text())
    manifest["files"]["ood/stats.json"] = {"sha256": hashlib.sha256(b'{"threshold": 1.5}').hexdigest()}
    (parent / "manifest.json").write_text(json.dumps(manifest))
    model = (parent / MODEL_FILE).read_bytes()

    out = derive_bundle(parent, tmp_path / "child", model, precision="fp32", updates={"note": "copy"})
    child = load_bundle(out)
    assert (out / "ood" / "stats.json").read_text() == '{"threshold": 1.5}'
    assert child.manifest["note"] == "copy" and child.manifest["precision"] == "fp32"
    assert set(child.manifest["files"]) == {MODEL_FILE, "ood/stats.json"}
    broken = onnx.load_from_string(model)
    _break_outputs(broken)
    with pytest.raises(ArtifactError, match="derived model.onnx: ONNX Runtime cannot load it"):
        derive_bundle(parent, tmp_path / "other", broken.SerializeToString(), precision="fp32")
    with pytest.raises(UsageError, match="cannot replace its parent"):
        derive_bundle(parent, parent, model, precision="fp32")
    with pytest.raises(UsageError, match="sets files itself"):
        derive_bundle(parent, tmp_path / "other", model, precision="fp32", updates={"files": {}})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a bundle; refusing"):
        derive_bundle(parent, tmp_path / "data", model, precision="fp32")
    (parent / "ood" / "stats.json").write_text('{"threshold": 9}')  # altered after loading
    with pytest.raises(ArtifactError, match="ood/stats.json sha256 mismatch"):
        derive_bundle(load_bundle(parent, verify=False), tmp_path / "other", model, precision="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child", "data", "parent"]
