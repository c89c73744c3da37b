"""Every registered model and the recommended timm families share one interface."""

from __future__ import annotations

import pytest
import torch

from lensforge.errors import UsageError
from lensforge.models import MODELS, count_params, create_model, default_preprocess, list_models

SMALL_TIMM = ["resnet10t", "mobilenetv3_small_050", "tf_efficientnet_lite0", "convnext_atto"]


@pytest.mark.parametrize("name", MODELS.list() + SMALL_TIMM)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_model_interface(name, in_chans):
    model = create_model(name, num_classes=5, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        width = getattr(model, "head_hidden_size", None) or model.num_features  # mobilenetv3: after conv_head
        assert logits.shape == (2, 5) and features.shape == (2, width)
        assert torch.allclose(model.get_classifier()(features), logits, atol=1e-5)
    pre = default_preprocess(model, image_size=32, channels=in_chans)
    assert pre.input_size == (32, 32) and len(pre.mean) == in_chans
    assert count_params(model) > 0


def test_tiny_family_is_small_and_ordered():
    sizes = [count_params(create_model(n, num_classes=10)) for n in ("tinycnn_xs", "tinycnn_s", "tinycnn_m")]
    assert sizes == sorted(sizes) and sizes[0] < 200_000


def test_unknown_model_suggests_close_names():
    with pytest.raises(UsageError, match="did you mean.*resnet18"):
        create_model("resnet181", num_classes=3)
    with pytest.raises(UsageError, match="tinycnn_s"):
        create_model("tinycnn_ss", num_classes=3)


def test_list_models_merges_ours_and_timm():
    names = list_models("*")
    assert "tinycnn_s" in names and "resnet18" in names
    assert list_models("tinycnn*", include_timm=False) == ["tinycnn_m", "tinycnn_s", "tinycnn_xs"]


def test_bad_arguments():
    with pytest.raises(UsageError, match="num_classes"):
        create_model("tinycnn_s", num_classes=0)
    with pytest.raises(UsageError, match="no pretrained weights"):
        create_model("tinycnn_s", num_classes=3, pretrained="package")
