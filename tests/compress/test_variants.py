from __future__ import annotations

import json

import pytest
import torch

from lensforge.compress.variants import CompressConfig, Variant, _guard, _retime_if_close, compress
from lensforge.deploy import load_bundle
from lensforge.errors import ArtifactError, ConfigError, UsageError
from lensforge.train import load_run, resolve_config, train
from lensforge.train.config import make_config_of


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    train(resolve_config(None, data="builtin:digits", model="tinycnn_s", image_size=8, epochs=4, out=str(out)),
          show_progress=False)
    return out


def _variant(name, accuracy, p50, parent="baseline"):
    return Variant(name, "x", parent, f"/tmp/{name}", {"accuracy": accuracy}, {"p50": p50}, 1.0)


@pytest.mark.parametrize("accuracy, p50, status, words", [
    (0.95, 1.0, "accepted", "2.00x faster"),
    (0.90, 1.0, "rejected", "accuracy drop 6.00 points > allowed 1"),
    (0.96, 2.5, "rejected", "not clearly faster than baseline"),
    (0.96, 1.95, "rejected", "not clearly faster than baseline"),  # 2.6% faster: within timing noise
])
def test_guard_verdicts(accuracy, p50, status, words):
    parent = _variant("baseline", 0.96, 2.0, parent=None)
    child = _variant("child", accuracy, p50)
    _guard(child, parent, CompressConfig(quantize=("int8",), max_drop=1.0))
    assert child.status == status and words in child.reason


def test_prune_distill_int8_variants_measured_on_artifacts(run_dir):
    cfg = CompressConfig(prune=0.5, round_to=4, distill=True, quantize=("int8",), finetune_epochs=1, max_drop=5.0)
    result = compress(run_dir, cfg)
    names = [v.name for v in result.variants]
    assert names == ["baseline", "pruned-50-kd", "int8", "pruned-50-kd-int8"]
    by_name = {v.name: v for v in result.variants}
    assert by_name["pruned-50-kd"].params < by_name["pruned-50-kd"].details["params_before"] / 3
    for v in result.variants:
        bundle = load_bundle(v.bundle)  # every variant is a verified, loadable bundle
        assert v.latency_ms["p50"] > 0 and v.size_mb > 0 and 0 <= v.metrics["accuracy"] <= 1
        if v.kind == "int8":
            assert bundle.manifest["precision"] == "int8"
        if v.parent is not None:
            assert v.status in ("accepted", "rejected") and v.reason and v.speedup is not None
    saved = json.loads((run_dir / "variants" / "variants.json").read_text())
    assert [v["name"] for v in saved["variants"]] == names
    assert json.loads((run_dir / "variants" / "int8" / "variant.json").read_text())["parent"] == "baseline"
    assert by_name["int8"].size_mb < by_name["baseline"].size_mb / 2
    pruned = load_run(run_dir / "variants" / "pruned-50-kd")  # the pruned structure is rebuilt from run.json
    assert sum(p.numel() for p in pruned.model.parameters()) == by_name["pruned-50-kd"].params
    assert json.loads((run_dir / "variants" / "pruned-50-kd" / "run.json").read_text())["teacher"] == str(run_dir)
    widths = [m.out_channels for m in pruned.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths and all(w % 4 == 0 for w in widths)  # round_to keeps kernel-friendly widths


def test_near_calls_are_timed_again(run_dir):
    bundle = str(run_dir / "bundle")  # the same artifact twice: a speed-up of ~1, a near call
    parent = Variant("baseline", "baseline", None, bundle, {"accuracy": 0.9}, {"p50": 1.0}, 1.0)
    child = Variant("child", "int8", "baseline", bundle, {"accuracy": 0.9}, {"p50": 0.95}, 1.0)
    _retime_if_close(child, parent, CompressConfig(quantize=("int8",)))
    assert child.details["retimed"]["first_speedup"] == pytest.approx(1 / 0.95, abs=1e-3)
    assert child.latency_ms["p50"] > 0 and child.latency_ms["p50"] != 0.95
    far = Variant("far", "int8", "baseline", bundle, {"accuracy": 0.9}, {"p50": 0.5}, 1.0)
    _retime_if_close(far, parent, CompressConfig(quantize=("int8",)))
    assert "retimed" not in far.details and far.latency_ms["p50"] == 0.5  # clear verdicts are kept


def test_bad_requests(run_dir, tmp_path):
    with pytest.raises(UsageError, match="not a run folder"):
        compress(tmp_path, CompressConfig(quantize=("int8",)))
    with pytest.raises(UsageError, match="nothing to do"):
        compress(run_dir, CompressConfig())
    with pytest.raises(UsageError, match="--distill"):
        compress(run_dir, CompressConfig(distill=True, quantize=("int8",)))
    with pytest.raises(ConfigError, match="prune"):
        make_config_of(CompressConfig, {"prune": 1.5})


def test_altered_bundle_is_refused(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    model = copy / "bundle" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        compress(copy, CompressConfig(quantize=("int8",)))
