"""`lensforge.tune.tune` end to end on tiny studies: outputs, resume, pruning, several objectives.

Every study here trains tinycnn_xs on 8 px digits for 1-2 epochs of a few batches; the
fixtures do the tuning (and are marked slow through ``slow_fixture``), the tests read what
it left behind.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from helpers import slow_fixture

from lensforge.tune import ChoiceParam, FloatParam
from lensforge.tune.study import counted

TINY = {"data": "builtin:digits", "model": "tinycnn_xs", "epochs": 1, "max_train_batches": 2,
        "train_options": {"batch_size": 32}}


def _tune(**options: Any) -> Any:
    from lensforge.tune import tune

    return tune(**{**TINY, **options})


def _csv_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


@slow_fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-trial study (default search space, journal storage), then the same --out asked for 4 trials."""
    out = tmp_path_factory.mktemp("tune") / "study"
    first = _tune(trials=2, out=str(out))
    first_rows = _csv_rows(out)
    second = _tune(trials=4, out=str(out))
    return {"out": out, "first": first, "first_rows": first_rows, "second": second}


def test_resume_counts_the_trials_already_done(resumed):
    assert [r["number"] for r in resumed["first_rows"]] == ["0", "1"]
    trials = resumed["second"].trials
    assert [t["number"] for t in trials] == [0, 1, 2, 3]  # two more, none repeated
    assert [t["params"] for t in trials[:2]] == [t["params"] for t in resumed["first"].trials]
    assert (resumed["out"] / "study.journal").is_file()


def test_the_first_trial_trains_the_default_configuration(resumed):
    first = resumed["first"].trials[0]["params"]
    # lensforge train's defaults at this study's batch size (32): lr 2e-3 per 128 images, sqrt-scaled
    assert first["lr"] == pytest.approx(1e-3)
    assert {k: first[k] for k in ("weight_decay", "label_smoothing", "augment", "mixup", "cutmix", "batch_size")} == {
        "weight_decay": 0.05, "label_smoothing": 0.1, "augment": "light", "mixup": 0.0, "cutmix": 0.0, "batch_size": 32}


def test_trials_csv_has_a_row_per_trial_with_values_params_and_run_folder(resumed):
    rows = _csv_rows(resumed["out"])
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"]
    assert {"number", "state", "accuracy", "params_lr", "params_augment", "params_image_size", "duration_s",
            "run_dir"} <= set(rows[0])
    for row in rows:
        assert row["state"] in ("COMPLETE", "PRUNED")
        assert Path(row["run_dir"]) == resumed["out"] / "trials" / f"{int(row['number']):04d}"
        assert (Path(row["run_dir"]) / "run.json").is_file()
        assert 0 <= float(row["accuracy"]) <= 1


def test_every_trial_is_a_run_folder_on_the_same_split(resumed):
    folders = sorted((resumed["out"] / "trials").iterdir())
    assert [f.name for f in folders] == ["0000", "0001", "0002", "0003"]
    splits = {(f / "splits.json").read_text() for f in folders}
    assert len(splits) == 1  # one seed, one split: trials are compared on the same validation images


def test_best_yaml_is_a_training_config_that_trains(resumed, tmp_path):
    from lensforge.train import resolve_config, train

    best_yaml = resumed["out"] / "best.yaml"
    cfg = resolve_config(best_yaml, out=str(tmp_path / "again"))
    summary = resumed["second"].summary
    assert "out" not in yaml.safe_load(best_yaml.read_text())  # `lensforge train --config` picks a fresh folder
    for name, value in summary["best"]["params"].items():
        assert getattr(cfg, name) == value
    result = train(cfg, show_progress=False)
    assert result.history and (tmp_path / "again" / "model.safetensors").is_file()


def test_the_best_run_is_exported_and_tested_through_its_bundle(resumed):
    result = resumed["second"]
    best = result.summary["best"]
    assert best["trial"] == max((t for t in result.trials if t["state"] == "COMPLETE"),
                                key=lambda t: t["values"]["accuracy"])["number"]
    assert (result.bundle / "manifest.json").is_file() and result.bundle == resumed["out"] / "best" / "bundle"
    test = json.loads((result.best_run / "eval" / "test.json").read_text())
    assert best["test"]["accuracy"] == pytest.approx(test["accuracy"]) == pytest.approx(result.test_accuracy)
    assert test["evaluated"] == "bundle"
    assert best["reused_trial_run"]  # its trial trained with the same settings: copied, not trained again
    assert yaml.safe_load((result.best_run / "config.yaml").read_text())["out"] == str(resumed["out"] / "best")


def test_summary_plots_and_reports(resumed):
    result = resumed["second"]
    summary = json.loads((resumed["out"] / "tune.json").read_text())
    assert summary["counts"].get("COMPLETE", 0) + summary["counts"].get("PRUNED", 0) == 4
    assert summary["objectives"] == ["accuracy"] and summary["trials_requested"] == 4
    assert set(summary["plots"]) >= {"history"}
    for relpath in summary["plots"].values():
        assert (resumed["out"] / relpath).read_bytes().startswith(b"\x89PNG")
    for report in (result.report, result.best_run / "report.html"):
        html = report.read_text()
        assert 'id="tuning"' in html and "data:image/png;base64," in html
        assert f"{summary['counts'].get('COMPLETE', 0)} complete" in html


def test_the_table_fits_80_columns(resumed):
    from rich.console import Console

    console = Console(width=80, record=True)
    console.print(resumed["second"].table())
    assert max(len(line) for line in console.export_text().splitlines()) <= 80


# ---------------------------------------------------------------------------- pruning


@slow_fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Trial 0 learns (lr 1e-2), trial 1 cannot (lr 1e-7): the median pruner must stop trial 1 after epoch 1."""
    root = tmp_path_factory.mktemp("prune")
    storage = f"sqlite:///{root / 'study.db'}"
    study = optuna.create_study(study_name="prune", storage=storage, direction="maximize")
    study.enqueue_trial({"lr": 1e-2})
    study.enqueue_trial({"lr": 1e-7})
    result = _tune(trials=2, epochs=2, max_train_batches=12, study="prune", storage=storage, out=str(root / "out"),
                   pruner_startup_trials=1, prune_after_epoch=1, space=(FloatParam("lr", 1e-8, 1e-1, log=True),),
                   train_options={"batch_size": 32, "warmup_epochs": 0, "schedule": "constant", "image_size": 8})
    return {"result": result, "storage": storage, "root": root}


def test_a_clearly_worse_trial_is_pruned_after_its_first_epoch(pruned):
    trials = optuna.load_study(study_name="prune", storage=pruned["storage"]).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    assert trials[1].intermediate_values.keys() == {1}  # stopped after epoch 1 of 2
    lines = (pruned["root"] / "out" / "trials" / "0001" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert pruned["result"].summary["best"]["trial"] == 0


# ---------------------------------------------------------------------------- several objectives


@slow_fixture(scope="module")
def pareto(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("pareto") / "out"
    space = (ChoiceParam("image_size", (8, 16)), FloatParam("lr", 1e-3, 1e-2, log=True))
    return _tune(trials=2, objectives=("accuracy", "latency_ms"), out=str(out), space=space)


def test_accuracy_and_latency_give_a_pareto_front(pareto):
    summary = pareto.summary
    assert summary["objectives"] == ["accuracy", "latency_ms"] and summary["directions"] == ["maximize", "minimize"]
    assert summary["pareto"] and set(summary["pareto"]) <= {t["number"] for t in pareto.trials}
    front = [t for t in pareto.trials if t["pareto"]]
    assert all(t["state"] == "COMPLETE" and t["values"]["latency_ms"] > 0 for t in front)
    assert summary["best"]["trial"] in summary["pareto"]
    assert (pareto.out / summary["plots"]["pareto"]).is_file()
    assert all(t["state"] != "PRUNED" for t in pareto.trials)  # Optuna does not prune multi-objective studies


def test_a_trial_that_fails_is_recorded_and_the_study_goes_on(tmp_path):
    from lensforge.errors import LensforgeError

    with pytest.raises(LensforgeError, match="no trial of study 'out' completed"):  # TinyCNN has no weights
        _tune(trials=2, out=str(tmp_path / "out"), space=(ChoiceParam("pretrained", ("package",)),))
    rows = _csv_rows(tmp_path / "out")
    assert [(r["number"], r["state"]) for r in rows] == [("0", "FAIL"), ("1", "FAIL")]  # the second still ran
    assert all("has no pretrained weights" in r["error"] for r in rows)


def test_counted_trials():
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=0.5))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"error": "bad"}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"stale": "killed"}))
    assert [counted(t) for t in study.trials] == [True, True, True, False]
