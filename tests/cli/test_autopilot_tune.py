"""`autopilot --tune N`: a real tuned run (API) read back, and the CLI's one-line refusals.

One tiny run serves every check here: tinycnn_xs on 8 px digits, 2 trials, 3 batches per
epoch, no guardrails, logged to a local MLflow store (so it also checks autopilot's MLflow
logging: the train-side checks are in tests/train/test_tracking.py).
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import require_extra, run, slow_fixture
from rich.console import Console

from lensforge.train.config import TrainConfig, load_config_file, make_config
from lensforge.tune.budgeted import decide

require_extra("optuna", "tune")


@slow_fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from lensforge.autopilot import autopilot

    root = tmp_path_factory.mktemp("autotune")
    printed = io.StringIO()
    tracking = importlib.util.find_spec("mlflow") is not None  # without it, only the MLflow check is skipped
    # seed 4: here the study's best is not trial 0, so the re-check runs (the checks hold either way)
    result = autopilot(out=root / "run", seed=4, model="tinycnn_xs", epochs=2, image_size=8, max_train_batches=3,
                       guardrails=False, show_progress=False, tune_trials=2,
                       mlflow_uri=f"file:{root / 'mlruns'}" if tracking else None,
                       console=Console(file=printed, width=200))
    return {"result": result, "summary": result.summary, "tune": result.summary["tune"], "printed": printed.getvalue(),
            "mlruns": root / "mlruns"}


def test_summary_has_the_tune_block_with_its_share_of_the_budget(tuned):
    summary, tune = tuned["summary"], tuned["tune"]
    assert tune["trials_requested"] == 2 and tune["trials_run"] == 2
    assert sum(tune["counts"].values()) == 2 and 1 <= tune["trial_epochs"] <= 2
    split = tune["budget_split_s"]
    assert split["total"] == pytest.approx(summary["budget_s"], abs=0.1)
    assert split["tune"] + split["final"] == pytest.approx(split["total"], abs=0.2)
    assert 0 < tune["time_s"] == summary["timings_s"]["tune"] < summary["timings_s"]["total"]
    assert set(tune["best_params"]) >= {"lr", "batch_size", "weight_decay"}
    assert isinstance(tune["adopted"], bool) and tune["reason"]
    assert "tuning first: up to 2 trials" in tuned["printed"] and "of the" in tuned["printed"]
    assert any(line.startswith("tuning: 2 of 2 trials") for line in tuned["result"].summary_lines())


def test_best_yaml_is_a_training_config(tuned):
    best = Path(tuned["tune"]["best_config"])
    assert best == Path(tuned["tune"]["study"]) / "best.yaml" and best.is_file()
    config = make_config(load_config_file(best), where=str(best))
    assert config.model == "tinycnn_xs" and config.epochs == tuned["tune"]["trial_epochs"]
    assert (Path(tuned["tune"]["study"]) / "trials.csv").is_file()


def test_adopted_follows_the_second_seed_and_the_final_run_trains_what_was_chosen(tuned):
    tune, run_dir = tuned["tune"], tuned["result"].out
    final = make_config(load_config_file(run_dir / "config.yaml"))
    recheck = tune.get("recheck")
    if recheck is None:  # the default itself won the study: nothing to re-check, nothing to adopt
        assert tune["best_trial"] == 0 and tune["adopted"] is False
    else:
        assert recheck["seed"] == 5 and recheck["epochs"] == tune["trial_epochs"]
        assert tune["adopted"] is decide(recheck)[0]
        assert tune["adopted"] is (recheck["tuned"] >= recheck["default"])
        word = "at least as good" if tune["adopted"] else "worse than the default"
        assert word in tune["reason"] and f"{recheck['tuned']:.1%}" in tune["reason"]
        # both re-check runs trained on the study's split with the next seed
        for name in ("default", "tuned"):
            rerun = make_config(load_config_file(Path(tune["study"]) / "recheck" / name / "config.yaml"))
            assert rerun.seed == 5 and Path(rerun.splits_file).name == "splits.json"
    chosen = tune["best_params"] if tune["adopted"] else {k: TrainConfig.model_fields[k].default
                                                          for k in tune["best_params"]}
    assert {k: getattr(final, k) for k in chosen} == chosen
    assert final.seed == 4 and final.max_train_batches == 3  # the run's own options, whichever config won
    assert ("adopted the tuned configuration" if tune["adopted"] else "kept the default configuration") in \
        tuned["printed"]


def test_autopilot_logs_the_final_training_and_the_bundle_to_mlflow(tuned, monkeypatch):
    require_extra("mlflow", "tracking")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tuned['mlruns']}")
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("lensforge").experiment_id])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "run"
    assert mlflow_run.data.params["model"] == "tinycnn_xs" and mlflow_run.data.params["data"] == "builtin:digits"
    history = client.get_metric_history(mlflow_run.info.run_id, "val_acc")
    assert [m.step for m in history] == list(range(1, tuned["summary"]["epochs_run"] + 1))
    test = tuned["summary"]["metrics"]["test"]
    assert mlflow_run.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert mlflow_run.data.tags["lensforge.tune.adopted"] == json.dumps(tuned["tune"]["adopted"])
    bundle = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "bundle")}
    assert {"bundle/manifest.json", "bundle/model.onnx"} <= bundle
    assert "summary.json" in {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}


@pytest.mark.parametrize(("args", "message"), [
    (("--tune", "2", "--max-latency-ms", "5"), "--tune cannot yet be combined with a latency/size budget"),
    (("--tune", "0"), "--tune: 0 is not at least 1"),
])
def test_bad_tune_options_are_one_line_and_exit_2(args, message, tmp_path):
    result = run("autopilot", "--data", "builtin:digits", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_tune_without_optuna_names_the_extra(tmp_path):
    code = ("import sys\nsys.modules['optuna'] = None  # as without the tune extra\n"
            "sys.argv = ['lensforge', 'autopilot', '--tune', '2']\nfrom lensforge.cli import main\nmain()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            check=False)
    assert result.returncode == 2, result.stderr
    assert "pip install 'lensforge[tune]'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
