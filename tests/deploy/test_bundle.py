"""Bundle manifest, hashes, loading, and refusal of altered or incomplete bundles."""

from __future__ import annotations

import json
import shutil
from datetime import datetime

import numpy as np
import onnx
import pytest
import torch
from helpers import tree_digest

from lensforge.data.preprocess import normalize
from lensforge.deploy import is_bundle, load_bundle
from lensforge.deploy.export import LogitsAndFeatures
from lensforge.errors import ArtifactError, LensforgeError, UsageError
from lensforge.utils.io import sha256_file


@pytest.fixture
def bundle_copy(bundle, tmp_path):
    """A private copy of the session bundle that a test may damage."""
    return shutil.copytree(bundle.path, tmp_path / "bundle")


def _edit_manifest(folder, **changes):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_describes_the_bundle(bundle, class_names):
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    assert manifest["format"] == "lensforge-bundle" and manifest["format_version"] == 2
    assert manifest["task"] == "classification" and manifest["model"] == "resnet10t"
    assert manifest["class_names"] == class_names and manifest["num_classes"] == 4
    assert manifest["preprocess"] == bundle.pre.to_dict()
    assert manifest["inputs"] == [
        {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "uint8"}
    ]
    assert manifest["outputs"] == [
        {"name": "logits", "shape": ["batch", 4]},
        {"name": "features", "shape": ["batch", bundle.model.num_features]},
    ]
    assert manifest["exporter"]["dynamo"] is True and manifest["exporter"]["opset"] >= 18
    assert manifest["parity"]["n_images"] == len(bundle.images)
    assert manifest["parity"]["atol"] == 1e-3
    assert manifest["metrics"] == {"val_accuracy": 0.5}
    assert manifest["extra"] == {"run": "unit-test"}
    assert manifest["temperature"] == 1.0
    assert set(manifest["versions"]) == {"lensforge", "torch", "onnx", "onnxruntime", "timm"}
    assert datetime.fromisoformat(manifest["created"]).utcoffset().total_seconds() == 0
    model_file = bundle.path / "model.onnx"
    assert manifest["files"] == {
        "model.onnx": {"sha256": sha256_file(model_file), "bytes": model_file.stat().st_size}
    }
    assert sorted(p.name for p in bundle.path.iterdir()) == ["manifest.json", "model.onnx"]


def test_loaded_bundle_runs_like_the_pytorch_model(bundle, class_names):
    loaded = load_bundle(bundle.path, intra_op_num_threads=1)
    assert loaded.preprocess == bundle.pre
    assert loaded.class_names == class_names and loaded.temperature == 1.0
    assert loaded.session.get_session_options().intra_op_num_threads == 1
    wrapper = LogitsAndFeatures(bundle.model).eval()
    for batch_size in (1, 5):
        images = bundle.images[:batch_size]
        logits, features = loaded.predict_uint8(images)
        with torch.inference_mode():
            ref_logits, ref_features = wrapper(torch.from_numpy(normalize(images, bundle.pre)))
        np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4)
        np.testing.assert_allclose(features, ref_features.numpy(), atol=1e-4)
        # run() still takes normalised floats: mapped back to the same pixels, the same logits
        np.testing.assert_array_equal(loaded.run(normalize(images, bundle.pre))[0], logits)
        np.testing.assert_array_equal(loaded.model_input(images), images)


def test_the_model_takes_uint8_pixels_and_normalises_them_in_float(bundle):
    graph = onnx.load(str(bundle.path / "model.onnx")).graph
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [("input", onnx.TensorProto.UINT8)]
    # Cast, Mul, Add in front of the first Conv: not folded into its weights (zero padding would differ)
    assert [node.op_type for node in graph.node[:4]] == ["Cast", "Mul", "Add", "Conv"]
    constants = {i.name: onnx.numpy_helper.to_array(i).ravel() for i in graph.initializer}
    scale, shift = (constants[graph.node[i].input[1]] for i in (1, 2))
    mean, std = np.array(bundle.pre.mean), np.array(bundle.pre.std)
    np.testing.assert_allclose(scale, 1 / (255 * std), rtol=1e-6)
    np.testing.assert_allclose(shift, -mean / std, rtol=1e-6)


def test_a_version_1_bundle_still_loads_and_predicts_like_version_2(bundle, v1_bundle, tmp_path, make_photo):
    from lensforge.deploy.predict import predict_files

    old, new = load_bundle(v1_bundle), load_bundle(bundle.path)
    assert (old.manifest["format_version"], old.input_dtype) == (1, "float32")
    assert (new.manifest["format_version"], new.input_dtype) == (2, "uint8")
    assert old.model_input(bundle.images).dtype == np.float32  # normalised in NumPy for version 1
    old_logits, old_features = old.predict_uint8(bundle.images)
    new_logits, new_features = new.predict_uint8(bundle.images)
    np.testing.assert_array_equal(old_logits.argmax(1), new_logits.argmax(1))
    np.testing.assert_allclose(old_logits, new_logits, atol=1e-4)
    np.testing.assert_allclose(old_features, new_features, atol=1e-4)
    x = normalize(bundle.images, bundle.pre)
    np.testing.assert_allclose(old.run(x)[0], new.run(x)[0], atol=1e-4)
    rng = np.random.default_rng(3)
    for i in range(4):
        make_photo(rng, (40 + 9 * i, 50)).save(tmp_path / f"{i}.png")
    rows = [list(predict_files(b, tmp_path)) for b in (old, new)]
    assert [r["label"] for r in rows[0]] == [r["label"] for r in rows[1]]
    np.testing.assert_allclose([r["confidence"] for r in rows[0]], [r["confidence"] for r in rows[1]], atol=1e-5)


def test_derived_models_must_keep_the_parents_input_dtype(bundle, v1_bundle, tmp_path):
    from lensforge.deploy.bundle import derive_bundle

    float_model, uint8_model = (v1_bundle / "model.onnx").read_bytes(), (bundle.path / "model.onnx").read_bytes()
    with pytest.raises(ArtifactError, match=r"is tensor\(float\), but the parent bundle's model takes uint8"):
        derive_bundle(bundle.path, tmp_path / "a", float_model, precision="fp32")
    with pytest.raises(ArtifactError, match=r"is tensor\(uint8\), but the parent bundle's model takes float32"):
        derive_bundle(v1_bundle, tmp_path / "b", uint8_model, precision="fp32")
    child = load_bundle(derive_bundle(v1_bundle, tmp_path / "c", float_model, precision="fp32"))
    assert child.manifest["format_version"] == 1 and child.input_dtype == "float32"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_manifest_that_misstates_the_input_dtype_fails_on_load(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["inputs"][0]["dtype"] = "float32"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="says model.onnx takes 'input' as float32"):
        load_bundle(bundle_copy).predict_uint8(np.zeros((1, 3, 32, 32), np.uint8))
    manifest["inputs"][0]["dtype"] = "int16"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="input dtype 'int16'"):
        load_bundle(bundle_copy)


def test_bad_batches_are_usage_errors(bundle):
    loaded = load_bundle(bundle.path, verify=False)
    with pytest.raises(UsageError, match="uint8"):
        loaded.predict_uint8(bundle.images.astype(np.float32))
    with pytest.raises(UsageError, match=r"shape \(N, 3, 32, 32\)"):
        loaded.run(np.zeros((2, 3, 16, 16), np.float32))


def test_flipped_byte_is_a_sha256_mismatch(bundle_copy):
    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as info:
        load_bundle(bundle_copy)
    message = str(info.value)
    assert "model.onnx sha256 mismatch" in message and "altered or damaged" in message
    assert "\n" not in message and str(bundle_copy) in message
    assert load_bundle(bundle_copy, verify=False).manifest["model"] == "resnet10t"


def test_truncated_model_is_a_size_mismatch(bundle_copy):
    model = bundle_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="model.onnx size mismatch"):
        load_bundle(bundle_copy)


def test_missing_model_is_reported(bundle_copy):
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="model.onnx is missing"):
        load_bundle(bundle_copy)
    with pytest.raises(ArtifactError, match="model.onnx is missing"):
        load_bundle(bundle_copy, verify=False)


def _list_extra_file(folder, name):
    files = json.loads((folder / "manifest.json").read_text())["files"]
    _edit_manifest(folder, files={**files, name: {"sha256": "0" * 64, "bytes": 1}})


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: (b / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda b: (b / "manifest.json").unlink(), "no manifest.json"),
        (lambda b: _edit_manifest(b, format="other-tool"), "format is 'other-tool'"),
        (lambda b: _edit_manifest(b, format_version=99), "format_version 99"),
        (lambda b: _list_extra_file(b, "../outside.bin"), "unsafe file name '../outside.bin'"),
        (lambda b: _list_extra_file(b, "ood.npz"), "ood.npz is missing"),
        (lambda b: _edit_manifest(b, temperature=0), "temperature"),
    ],
)
def test_damaged_manifest_is_an_artifact_error(bundle_copy, damage, match):
    damage(bundle_copy)
    with pytest.raises(ArtifactError, match=match):
        load_bundle(bundle_copy)


def test_paths_that_are_not_bundles(tmp_path):
    (tmp_path / "file.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    for path, match in [
        (tmp_path / "nowhere", "no such folder"),
        (tmp_path / "file.txt", "not a folder"),
        (tmp_path / "empty", "no manifest.json"),
    ]:
        assert not is_bundle(path)
        with pytest.raises(ArtifactError, match=match):
            load_bundle(path)


def test_is_bundle(bundle):
    assert is_bundle(bundle.path)


def test_update_bundle_adds_files_and_keys_atomically(bundle_copy):
    from lensforge.deploy.bundle import load_bundle, update_bundle

    updated = update_bundle(bundle_copy, files={"guardrails/extra.json": b'{"a": 1}'},
                            updates={"temperature": 1.5})
    assert updated.temperature == 1.5
    assert (bundle_copy / "guardrails" / "extra.json").read_bytes() == b'{"a": 1}'
    reloaded = load_bundle(bundle_copy)  # verifies every hash, the new file's included
    assert "guardrails/extra.json" in reloaded.manifest["files"]
    assert not [p for p in bundle_copy.parent.iterdir() if p.name.startswith(f".{bundle_copy.name}")]


@pytest.mark.parametrize("kwargs, match", [
    ({"files": {"model.onnx": b"x"}}, "cannot replace model.onnx"),
    ({"files": {"../escape.json": b"x"}}, "unsafe file name"),
    ({"updates": {"files": {}}}, "sets files itself"),
])
def test_update_bundle_refuses_bad_requests(bundle_copy, kwargs, match):
    from lensforge.deploy.bundle import update_bundle

    before = tree_digest(bundle_copy)
    with pytest.raises(LensforgeError, match=match):
        update_bundle(bundle_copy, **kwargs)
    assert tree_digest(bundle_copy) == before


def test_update_bundle_refuses_an_altered_bundle(bundle_copy):
    from lensforge.deploy.bundle import update_bundle

    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(LensforgeError, match="sha256 mismatch"):
        update_bundle(bundle_copy, updates={"temperature": 2.0})


def test_spin_false_turns_off_ort_thread_spinning(bundle):
    quiet = load_bundle(bundle.path, spin=False)
    options = quiet.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    logits, _ = quiet.run(np.zeros((1, quiet.preprocess.channels, *quiet.preprocess.input_size), np.float32))
    assert np.isfinite(logits).all()
