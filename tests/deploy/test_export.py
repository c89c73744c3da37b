"""ONNX export: parity with PyTorch, dynamic batch, exporter choice, failures leave nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lensforge.data.preprocess import Preprocess, normalize
from lensforge.deploy import load_bundle
from lensforge.deploy.export import (
    LogitsAndFeatures,
    check_parity,
    export_onnx,
    export_onnx_result,
    write_bundle,
)
from lensforge.errors import ExportError, UsageError
from lensforge.models.normalize import Normalize


class _TimmInterface(torch.nn.Module):
    """Minimal timm interface around a ``features(x) -> (N, D)`` function."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Unexportable(_TimmInterface):
    """Eigenvalues have no ONNX operator: both exporters must fail."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x[:, :, :3, :3]).real.mean(-1)


class DataDependent(_TimmInterface):
    """A branch on pixel values: dynamo refuses it, the legacy tracer bakes in the traced branch."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3))
        if pooled.mean() > 3:  # never true for the exporter's random example pixels, normalised near 0
            return pooled * 10
        return pooled


def _ort_run(path: Path, pixels: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits", "features"], {"input": pixels})


@pytest.mark.parametrize(
    ("name", "channels", "size"),
    [("resnet10t", 3, 32), ("resnet10t", 1, 32), ("mobilenetv3_small_050", 3, 64)],
)
def test_onnx_matches_pytorch_with_dynamic_batch(exported_bundle, name, channels, size):
    exported = exported_bundle(name, channels, size)
    manifest = json.loads((exported.path / "manifest.json").read_text())
    assert manifest["exporter"]["dynamo"] is True
    assert manifest["parity"]["max_abs_diff_logits"] <= 1e-3
    assert manifest["parity"]["top1_agreement"] == 1.0
    assert manifest["inputs"][0]["shape"] == ["batch", channels, size, size]
    wrapper = LogitsAndFeatures(exported.model).eval()
    for batch_size in (1, 5):
        pixels = exported.images[:batch_size]
        onnx_logits, onnx_features = _ort_run(exported.path / "model.onnx", pixels)  # uint8 straight in
        x = normalize(pixels, exported.pre)
        with torch.inference_mode():
            logits, features = wrapper(torch.from_numpy(x))
        assert onnx_logits.shape == (batch_size, 4)
        np.testing.assert_allclose(onnx_logits, logits.numpy(), atol=1e-4)
        np.testing.assert_allclose(onnx_features, features.numpy(), atol=1e-4)
        np.testing.assert_allclose(logits.numpy(), exported.model(torch.from_numpy(x)).detach())


def test_export_onnx_writes_one_quiet_self_contained_file(tmp_path, tiny_net, capfd):
    tiny_net.train()
    path = export_onnx(tiny_net, Preprocess(input_size=(16, 16)), tmp_path / "m.onnx")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # exporter chatter is swallowed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no .data, no temp files
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [(i.name, i.shape, i.type) for i in session.get_inputs()]
    assert inputs == [("input", ["batch", 3, 16, 16], "tensor(uint8)")]
    assert [o.name for o in session.get_outputs()] == ["logits", "features"]
    assert tiny_net.training  # the caller's mode is restored


def test_unexportable_model_gives_one_line_error_and_leaves_nothing(tmp_path, images_for):
    pre = Preprocess(input_size=(8, 8))
    with pytest.raises(ExportError) as info:
        write_bundle(
            Unexportable(), pre, ["a", "b"], tmp_path / "bundle",
            model_name="eig", sample_images=images_for(pre, 3),
        )  # fmt: skip
    message = str(info.value)
    assert "\n" not in message
    assert "dynamo exporter" in message and "legacy exporter" in message and "eig" in message
    assert list(tmp_path.iterdir()) == []  # no bundle, no .bundle.tmp-*


def test_legacy_fallback_is_recorded(tmp_path):
    result = export_onnx_result(DataDependent(), Preprocess(input_size=(8, 8)), tmp_path / "m.onnx")
    assert result.dynamo is False
    assert result.fallback_reason and result.fallback_reason.startswith("dynamo exporter:")
    assert result.opset >= 17 and result.path.is_file()


def test_parity_failure_keeps_the_old_bundle(tmp_path, bundle, images_for):
    # the legacy tracer baked in the "mean <= 3" branch; these white inputs, (1 - 0.5) / 0.1 = 5, take the other
    pre = Preprocess(input_size=(8, 8), mean=(0.5,) * 3, std=(0.1,) * 3)
    out_dir = tmp_path / "bundle"
    shutil.copytree(bundle.path, out_dir)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    with pytest.raises(ExportError, match=r"ONNX logits differ from PyTorch by .* on 6 validation"):
        write_bundle(
            DataDependent(), pre, ["a", "b"], out_dir,
            model_name="branchy", sample_images=np.full((6, 3, 8, 8), 255, np.uint8),
        )  # fmt: skip
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_check_parity_with_zero_tolerance_fails(bundle):
    onnx_path = bundle.path / "model.onnx"
    stats = check_parity(bundle.model, onnx_path, bundle.images, bundle.pre, batch_size=4)
    assert set(stats) == {
        "max_abs_diff_logits", "max_abs_diff_features", "top1_agreement", "atol", "n_images",
    }  # fmt: skip
    assert stats["n_images"] == len(bundle.images)
    if stats["max_abs_diff_logits"] == 0:
        pytest.skip("ONNX Runtime matched PyTorch bit for bit")
    with pytest.raises(ExportError, match=r"> atol 0"):
        check_parity(bundle.model, onnx_path, bundle.images, bundle.pre, atol=0.0)


def test_rewriting_replaces_a_bundle(tmp_path, tiny_net, images_for):
    pre = Preprocess(input_size=(16, 16))
    images = images_for(pre, 4)
    out_dir = tmp_path / "bundle"
    write_bundle(tiny_net, pre, list("abcd"), out_dir, model_name="v1", sample_images=images)
    write_bundle(tiny_net, pre, list("abcd"), out_dir, model_name="v2", sample_images=images)
    assert load_bundle(out_dir).manifest["model"] == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


@pytest.mark.parametrize(
    ("class_names", "images", "match"),
    [
        (list("abc"), np.zeros((2, 3, 16, 16), np.uint8), "outputs .4,. logits but 3 class names"),
        (list("abca"), np.zeros((2, 3, 16, 16), np.uint8), "duplicates"),
        (list("abcd"), np.zeros((2, 3, 32, 32), np.uint8), r"shape \(N >= 1, 3, 16, 16\)"),
        (list("abcd"), np.zeros((2, 3, 16, 16), np.float32), "uint8"),
    ],
)
def test_bad_arguments_fail_before_export(tmp_path, tiny_net, class_names, images, match):
    pre = Preprocess(input_size=(16, 16))
    with pytest.raises(UsageError, match=match):
        write_bundle(
            tiny_net, pre, class_names, tmp_path / "b", model_name="t", sample_images=images
        )
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(tmp_path, tiny_net):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"not really")
    pre = Preprocess(input_size=(16, 16))
    with pytest.raises(UsageError, match="not a bundle"):
        write_bundle(
            tiny_net, pre, list("abcd"), precious,
            model_name="t", sample_images=np.zeros((1, 3, 16, 16), np.uint8),
        )  # fmt: skip
    assert [p.name for p in precious.iterdir()] == ["holiday.jpg"]


@pytest.mark.parametrize("channels", [1, 3])
def test_torch_and_numpy_normalise_pixels_alike(channels):
    mean, std = (0.3, 0.5, 0.7)[:channels], (0.2, 0.25, 0.3)[:channels]
    pre = Preprocess(input_size=(4, 5), channels=channels, mean=mean, std=std)
    pixels = np.random.default_rng(0).integers(0, 256, (3, channels, 4, 5), dtype=np.uint8)
    torch_x = Normalize(pre.mean, pre.std)(torch.from_numpy(pixels))
    assert torch_x.dtype == torch.float32
    np.testing.assert_array_equal(torch_x.numpy(), normalize(pixels, pre))
    by_hand = (pixels / 255 - np.reshape(mean, (1, -1, 1, 1))) / np.reshape(std, (1, -1, 1, 1))
    np.testing.assert_allclose(normalize(pixels, pre), by_hand, rtol=1e-5, atol=1e-6)
    in_unit_range = Normalize(pre.mean, pre.std, pixel_max=1.0)(torch.from_numpy(pixels) / 255)
    np.testing.assert_allclose(in_unit_range.numpy(), torch_x.numpy(), atol=1e-5)


def test_model_without_timm_interface_is_a_usage_error():
    with pytest.raises(UsageError, match="forward_features"):
        LogitsAndFeatures(torch.nn.Linear(2, 2))
