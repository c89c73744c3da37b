"""``adapt``: every registered method on a tiny shapes run, adapted to a noisier camera.

One source run (tinycnn_xs, 24 px shapes, ~80% test accuracy, ~20 s) is trained per
module; each method adapts it once (cached), and the tests read what those calls wrote.
The target is ``noise=0.05`` with another seed: sensor noise drops the model to ~30%,
and re-estimating BatchNorm statistics recovers much of it (measured: 33% -> 61% on
300 held-out images), so a real improvement can be asserted with a wide margin.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tree_digest, write_image_folder
from safetensors.torch import load_file

from lensforge.data.sources import open_source
from lensforge.data.table import load_table
from lensforge.deploy.bundle import load_bundle
from lensforge.errors import DataError, UsageError
from lensforge.stress import adapt as adapt_module
from lensforge.stress.adapt import ADAPT_METHODS, adapt, batchnorm_layers, select_pseudo_labels
from lensforge.train import load_run, resolve_config, train

SIZE = 24
SOURCE = f"builtin:shapes?n=2400&size={SIZE}"
TARGET = f"builtin:shapes?n=600&size={SIZE}&seed=1&noise=0.05"  # another seed: other scenes than the source's
FAST = {"bn": {}, "tent": {}, "pseudo-label": {"epochs": 1}, "finetune": {"labels": 30, "epochs": 10}}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapt") / "run"
    cfg = resolve_config(None, data=SOURCE, model="tinycnn_xs", image_size=SIZE, epochs=20, batch_size=64,
                         out=str(out))
    train(cfg, show_progress=False)
    return out


@pytest.fixture(scope="module")
def digest(source_run) -> str:
    return tree_digest(source_run)


@pytest.fixture(scope="module")
def adapted(source_run, digest):
    """method -> (AdaptResult, origins of every image the method touched, origins it trained on)."""
    cache = {}

    def get(method: str):
        if method not in cache:
            touched, trained = set(), set()
            real_init, real_train = adapt_module.Batches.__init__, adapt_module._train_epochs

            def spy_init(self, table, indices, *args, **kwargs):
                touched.update(table.origins[i] for i in indices)
                real_init(self, table, indices, *args, **kwargs)

            def spy_train(model, optimizer, batches, *args, **kwargs):
                trained.update(batches.table.origins[i] for i in batches.indices)
                return real_train(model, optimizer, batches, *args, **kwargs)

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(adapt_module.Batches, "__init__", spy_init)
                patch.setattr(adapt_module, "_train_epochs", spy_train)
                result = adapt(source_run, TARGET, method=method, **FAST[method])
            cache[method] = (result, touched, trained)
        return cache[method]

    return get


@pytest.mark.parametrize("method", ADAPT_METHODS.list())
def test_every_method_writes_a_verified_adapted_run(method, source_run, digest, adapted):
    result, touched, trained = adapted(method)
    assert result.run_dir == source_run.parent / f"run-adapted-{method}"
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["adapted_from"]["run"] == str(source_run) and info["adapted_from"]["method"] == method
    assert info["adapted_from"]["target"].startswith("builtin:shapes?n=600") and info["name"] == result.run_dir.name
    for name in ("config.yaml", "splits.json", "model.safetensors", "stress/adapt.json", "stress/adapt_split.json"):
        assert (result.run_dir / name).exists(), name
    assert not (result.run_dir / "checkpoints").exists()
    assert not list(source_run.parent.glob(".run-adapted*")), "staging folder left behind"
    assert tree_digest(source_run) == digest, "the source run was modified"

    split = json.loads((result.run_dir / "stress/adapt_split.json").read_text())
    held_out = set(split["held_out"])
    assert len(held_out) == 300 and not held_out & set(split["adapt"])
    assert not touched & held_out, "adaptation looked at held-out evaluation images"
    assert trained <= set(split["labelled"] if method == "finetune" else split["adapt"])

    report = json.loads(result.report_path.read_text())
    assert report == result.report and report["method"] == method
    assert report["source_accuracy"]["before"] > 0.6  # the fixture trained a real model
    # The shipped bundle, reloaded from disk, predicts like the adapted torch model.
    target = load_table(open_source(TARGET), load_run(result.run_dir).preprocess)
    rows = [target.origins.index(origin) for origin in split["held_out"]]
    images, labels = target.images[rows], target.targets[rows]
    bundle = load_bundle(result.bundle)
    assert bundle.manifest["adaptation"]["method"] == method
    onnx_acc = float((bundle.predict_uint8(images)[0].argmax(1) == labels).mean())
    run = load_run(result.run_dir)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (run.preprocess.mean, run.preprocess.std))
    with torch.no_grad():
        x = (torch.from_numpy(images).float() / 255 - mean) / std
        torch_acc = float((run.model(x).argmax(1).numpy() == labels).mean())
    assert abs(onnx_acc - torch_acc) <= 1 / len(labels)
    assert torch_acc == pytest.approx(report["target_accuracy"]["after"])


def test_bn_reestimates_statistics_and_recovers_target_accuracy(source_run, adapted):
    result, _, trained = adapted("bn")
    before, after = load_file(source_run / "model.safetensors"), load_file(result.run_dir / "model.safetensors")
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(before[k], after[k]) for k in stats)
    others = [k for k in before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(before[k], after[k]) for k in others)
    assert not trained  # no gradient steps at all
    accuracy = result.report["target_accuracy"]
    assert accuracy["after"] >= accuracy["before"] + 0.15, accuracy
    assert result.report["target_error_reduction"] > 0.2


def test_tent_updates_only_batchnorm_affine_parameters(source_run, adapted):
    result, _, _ = adapted("tent")
    model = load_run(result.run_dir).model
    affine = {f"{name}.{p}" for name, m in model.named_modules() if m in batchnorm_layers(model)
              for p in ("weight", "bias")}
    before, after = load_file(source_run / "model.safetensors"), load_file(result.run_dir / "model.safetensors")
    params = {name for name, _ in model.named_parameters()}
    assert affine < params
    assert all(not torch.equal(before[k], after[k]) for k in affine)
    assert all(torch.equal(before[k], after[k]) for k in params - affine)
    assert len(result.report["method_stats"]["entropy_per_epoch"]) == ADAPT_METHODS.get("tent").epochs
    accuracy = result.report["target_accuracy"]
    assert accuracy["after"] >= accuracy["before"] + 0.15, accuracy


def test_finetune_trains_on_the_labelled_subset_only(adapted):
    result, _, trained = adapted("finetune")
    split = json.loads((result.run_dir / "stress/adapt_split.json").read_text())
    assert len(split["labelled"]) == 30 == result.report["split"]["labelled"]
    assert trained == set(split["labelled"]) and set(split["labelled"]) <= set(split["adapt"])
    target = open_source(TARGET)
    classes = {target.records[int(o.split("#")[1])].target for o in split["labelled"]}
    assert len(classes) == 6  # stratified: every class among 30 labels


def test_pseudo_labels_are_confident_and_capped_per_class():
    logits = np.array([[9, 0, 0], [8, 0, 0], [7, 0, 0], [0, 9, 0], [0, 0, 0.5], [6, 0, 0]], dtype=np.float32)
    indices = np.arange(10, 16)
    chosen, labels = select_pseudo_labels(logits, indices, threshold=0.9)
    # Class 0 is predicted 4 times but capped at ceil(6 / 3) = 2 (its most confident); row 4 is unsure.
    assert chosen.tolist() == [10, 11, 13] and labels.tolist() == [0, 0, 1]


def test_bad_inputs_fail_with_clear_errors(source_run, tmp_path):
    folders_before = sorted(source_run.parent.iterdir())
    with pytest.raises(UsageError, match="did you mean tent"):
        adapt(source_run, TARGET, method="tnet")
    with pytest.raises(UsageError, match="--labels"):
        adapt(source_run, TARGET, method="finetune")
    with pytest.raises(UsageError, match="must be below the 300 images"):
        adapt(source_run, TARGET, method="finetune", labels=300)
    with pytest.raises(UsageError, match="only used by finetune"):
        adapt(source_run, TARGET, method="bn", labels=10)
    with pytest.raises(UsageError, match="own training data"):
        adapt(source_run, SOURCE, method="bn")
    with pytest.raises(UsageError, match="inside the run"):
        adapt(source_run, TARGET, method="bn", out=source_run / "adapted")
    folder = write_image_folder(tmp_path / "other", classes=("circle", "blob"), size=SIZE)
    with pytest.raises(DataError, match="blob"):
        adapt(source_run, str(folder), method="bn")
    assert sorted(source_run.parent.iterdir()) == folders_before, "a failed call left a folder behind"


def test_model_without_batchnorm_needs_another_method(tmp_path):
    out = tmp_path / "ln"
    cfg = resolve_config(None, data="builtin:shapes?n=120&size=32", model="convnext_atto", image_size=32, epochs=1,
                         max_train_batches=1, batch_size=16, out=str(out))
    train(cfg, show_progress=False)
    assert not batchnorm_layers(load_run(out).model)
    for method in ("bn", "tent"):
        with pytest.raises(UsageError, match="has no BatchNorm layers; use pseudo-label or finetune"):
            adapt(out, "builtin:shapes?n=60&size=32&seed=1&noise=0.05", method=method)
