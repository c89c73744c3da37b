"""Structured pruning: real Torch-Pruning on real timm models and our TinyCNN (32 px, CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lensforge.errors import ArtifactError, UsageError
from lensforge.models import count_params, create_model, default_preprocess
from lensforge.models.prune import PruneStep, prune_model, replay_structure

NUM_CLASSES = 10
# Architectures checked to replay exactly from the op: their pruned channel counts do not
# depend on the weights (local pruning keeps int(channels * (1 - ratio)) per group).
REPLAYED = ["resnet18", "resnet10t", "mobilenetv3_small_100", "tf_efficientnet_lite0", "tinycnn_s"]


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=NUM_CLASSES).eval()


def _example(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("name", ["resnet18", "tinycnn_s"])
def test_half_the_channels_removes_about_three_quarters_of_params_and_macs(name):
    model = _model(name)
    x = _example(2)
    report = prune_model(model, _example(), ratio=0.5)
    # a channel ratio p keeps (1 - p)^2 of each conv's weights: ~4x fewer params and MACs
    assert 3.3 < report.params_before / report.params_after < 4.3
    assert 3.3 < report.macs_reduction < 4.3
    assert report.params_after == count_params(model)
    with torch.no_grad():
        assert model(x).shape == (2, NUM_CLASSES)
    assert model.get_classifier().out_features == NUM_CLASSES  # the classifier's outputs are never pruned
    assert report.structure["ignored"] == ["fc"]
    assert report.to_dict()["macs_reduction"] == report.macs_reduction


@pytest.mark.parametrize("round_to", [None, 8])
def test_iterative_schedule_reaches_the_one_step_shapes_and_calls_back_each_step(round_to):
    one_step, three_steps = _model("tinycnn_s", seed=0), _model("tinycnn_s", seed=1)
    prune_model(one_step, _example(), ratio=0.3, round_to=round_to)  # 0.3: 22 of 32 channels, 16 with round_to=8
    seen: list[PruneStep] = []
    report = prune_model(three_steps, _example(), ratio=0.3, iterative_steps=3, round_to=round_to,
                         on_step=seen.append)
    assert _shapes(three_steps) == _shapes(one_step)
    widths = [shape[0] for name, shape in _shapes(one_step).items() if name.endswith("conv.0.weight")]
    assert widths == ([16, 40, 88] if round_to else [22, 44, 89])
    assert [s.step for s in seen] == [1, 2, 3] and report.steps == 3
    params = [s.params for s in seen]
    assert params == sorted(params, reverse=True) and params[-1] == report.params_after
    assert seen[-1].ratio == pytest.approx(0.3)


@pytest.mark.parametrize("name", REPLAYED)
def test_replay_on_a_fresh_model_loads_the_pruned_safetensors_and_reproduces_outputs(name, tmp_path):
    pruned = _model(name, seed=0)
    report = prune_model(pruned, _example(), ratio=0.5, importance="l1")
    save_file(pruned.state_dict(), tmp_path / "model.safetensors")

    fresh = _model(name, seed=1)  # other weights: only the shapes come from the op
    replay_structure(fresh, [report.structure], _example())
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    x = _example(3, seed=1)
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))
    assert fresh.num_features == pruned.num_features


def test_random_importance_gives_the_same_shapes_so_replay_does_not_depend_on_weights():
    magnitude, random = _model("mobilenetv3_small_100", seed=0), _model("mobilenetv3_small_100", seed=1)
    prune_model(magnitude, _example(), ratio=0.3, round_to=4)
    prune_model(random, _example(), ratio=0.3, round_to=4, importance="random")
    assert _shapes(magnitude) == _shapes(random)


def test_replay_of_two_prune_ops_in_order():
    model = _model("tinycnn_s")
    ops = [prune_model(model, _example(), ratio=r).structure for r in (0.5, 0.25)]
    fresh = replay_structure(_model("tinycnn_s", seed=1), ops, _example())
    assert _shapes(fresh) == _shapes(model)


def test_replay_refuses_another_architecture_and_unknown_ops():
    report = prune_model(_model("tinycnn_s"), _example(), ratio=0.5)
    with pytest.raises(ArtifactError, match="other shapes than recorded"):
        replay_structure(create_model("tinycnn_xs", num_classes=NUM_CLASSES), [report.structure], _example())
    with pytest.raises(ArtifactError, match="unknown op 'quantize'"):
        replay_structure(_model("tinycnn_s"), [{"op": "quantize"}], _example())


def test_stale_width_attributes_are_updated_for_heads_features_and_reset_classifier():
    model = _model("mobilenetv3_small_100")  # num_features (blocks) differs from head_hidden_size (conv_head)
    prune_model(model, _example(), ratio=0.5)
    with torch.no_grad():
        features = model.forward_features(_example())
        pre_logits = model.forward_head(features, pre_logits=True)
    assert model.num_features == features.shape[1] < 576
    assert model.head_hidden_size == pre_logits.shape[1] < 1024
    assert model.feature_info[-1]["num_chs"] == model.num_features
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(_example()).shape == (1, 3)


def test_pruned_model_exports_to_onnx_with_logits_and_features_in_parity(tmp_path):
    from lensforge.deploy.export import check_parity, export_onnx

    model = _model("tinycnn_s")
    prune_model(model, _example(), ratio=0.5)
    pre = default_preprocess(model, image_size=32, channels=3)
    path = export_onnx(model, pre, tmp_path / "pruned.onnx")
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    parity = check_parity(model, path, images, pre)
    assert parity["max_abs_diff_logits"] < 1e-4 and parity["top1_agreement"] == 1.0


def test_train_flags_are_kept_and_taylor_importance_uses_the_loss():
    model = _model("tinycnn_s").train()
    x, y = _example(8), torch.arange(8) % NUM_CLASSES
    calls = []

    def loss(m):
        calls.append(1)
        return torch.nn.functional.cross_entropy(m(x), y)

    prune_model(model, _example(), ratio=0.25, iterative_steps=2, importance="taylor", taylor_loss=loss)
    assert len(calls) == 2
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 0.0}, "between 0 and 1"),
    ({"ratio": 1.0}, "between 0 and 1"),
    ({"ratio": -0.2}, "between 0 and 1"),
    ({"ratio": 0.5, "iterative_steps": 0}, "iterative_steps"),
    ({"ratio": 0.5, "importance": "l3"}, "l2, l1, random, taylor"),
    ({"ratio": 0.5, "importance": "taylor"}, "taylor_loss"),
    ({"ratio": 0.5, "round_to": 0}, "round_to"),
    ({"ratio": 0.5, "ignored_layers": ["no.such.layer"]}, "no.such.layer"),
])
def test_bad_arguments_raise_usage_errors_and_leave_the_model_alone(kwargs, message):
    model = _model("tinycnn_s")
    before = _shapes(model)
    with pytest.raises(UsageError, match=message):
        prune_model(model, _example(), **kwargs)
    assert _shapes(model) == before
