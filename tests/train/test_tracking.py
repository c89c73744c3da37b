"""`--mlflow URI`: what a training run logs to MLflow, read back from a local store; bad URIs; failures.

autopilot's logging (the bundle, the test numbers) is checked with its tuned run in
tests/cli/test_autopilot_tune.py.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require_extra, run
from rich.console import Console

from lensforge.train.tracking import Tracker, mlflow_tracking

mlflow = require_extra("mlflow", "tracking")


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A client on ``file:tmp_path/mlruns`` (MLflow 3 reads a file store only when asked to)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")


def _only_run(client):
    experiment = client.get_experiment_by_name("lensforge")
    [found] = client.search_runs([experiment.experiment_id])
    return found


def test_train_logs_its_config_every_epoch_and_its_files(tmp_path, client):
    result = run("train", "--data", "builtin:digits", "--model", "tinycnn_xs", "--image-size", "8", "--epochs", "2",
                 "--max-train-batches", "2", "--out", "runs/digits", "--mlflow", f"file:{tmp_path / 'mlruns'}", "-q",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    logged = _only_run(client)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "digits"
    assert logged.data.tags["lensforge.command"] == "train"
    params = logged.data.params
    saved = (tmp_path / "runs" / "digits" / "config.yaml").read_text()
    assert {"data": "builtin:digits", "model": "tinycnn_xs", "epochs": "2", "image_size": "8", "lr": "null"}.items() \
        <= params.items() and "out: runs/digits" in saved
    info = json.loads((tmp_path / "runs" / "digits" / "run.json").read_text())
    assert float(params["resolved.lr"]) == pytest.approx(info["resolved"]["lr"])  # the "auto" choices, resolved
    rows = [json.loads(line) for line in (tmp_path / "runs" / "digits" / "metrics.jsonl").read_text().splitlines()]
    for key in ("val_acc", "train_loss", "lr"):
        history = client.get_metric_history(logged.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r[key])) for r in rows]
    assert logged.data.metrics["best_val_acc"] == pytest.approx(info["best_val_acc"])
    files = {a.path for a in client.list_artifacts(logged.info.run_id, "run")}
    assert {"run/config.yaml", "run/metrics.jsonl", "run/run.json", "run/report.html"} <= files


def test_a_finished_run_is_logged_afterwards_as_resume_and_nproc_do(digits_run_template, tmp_path, client):
    """No live callback (a resumed or multi-process run): every epoch comes from metrics.jsonl."""
    with mlflow_tracking(f"file:{tmp_path / 'mlruns'}", run_name="later", command="train",
                         console=Console(file=io.StringIO())) as tracker:
        tracker.log_run(digits_run_template)
    logged = _only_run(client)
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "val_acc")] == [1, 2, 3]
    assert logged.data.params["epochs"] == "3" and logged.data.params["resolved.model"] == "tinycnn_xs"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.parametrize(("command", "uri", "reason"), [
    ("train", "nosuchscheme://host/x", "MLflow has no tracking store for 'nosuchscheme:' URIs"),
    ("train", "file:{tmp}/a-file/mlruns", "Not a directory"),
    ("train", "http://127.0.0.1:{port}", "no tracking server answers there (connection refused)"),
    ("autopilot", "http://127.0.0.1:{port}", "no tracking server answers there (connection refused)"),
])
def test_a_uri_that_cannot_be_opened_is_one_line_and_exit_2(command, uri, reason, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    uri = uri.format(port=_closed_port(), tmp=tmp_path)
    result = run(command, "--data", "builtin:digits", "--mlflow", uri, "--epochs", "1", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"--mlflow '{uri}' cannot be opened: {reason}" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_mlflow_missing_names_the_tracking_extra(tmp_path):
    code = ("import sys\nsys.modules['mlflow'] = None  # as without the tracking extra\n"
            "sys.argv = ['lensforge', 'train', '--mlflow', 'file:mlruns', '--epochs', '1']\n"
            "from lensforge.cli import main\nmain()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            check=False)
    assert result.returncode == 2, result.stderr
    assert "pip install 'lensforge[tracking]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


class _BrokenStore:
    """An MLflow client whose server went away after the run was opened."""

    calls = 0

    def log_batch(self, *args, **kwargs):
        self.calls += 1
        raise ConnectionError("connection refused\nretries exhausted")


def test_a_logging_failure_is_said_once_and_the_run_goes_on():
    printed = io.StringIO()
    store = _BrokenStore()
    tracker = Tracker(store, "run-id", Console(file=printed, width=200))
    callback = tracker.epoch_callback()
    for epoch in (1, 2, 3):
        callback({"epoch": epoch, "val_acc": 0.5})  # does not raise: training continues
    assert store.calls == 1 and not tracker.enabled and tracker.epoch_callback() is None
    assert printed.getvalue().count("MLflow:") == 1 and "connection refused" in printed.getvalue()
    assert "tracking stopped, the run goes on" in printed.getvalue()


def test_without_a_uri_nothing_is_tracked_and_training_gets_no_callback():
    with mlflow_tracking(None, run_name="x", command="train") as tracker:
        assert not tracker.enabled and tracker.epoch_callback() is None
        tracker.log_run("no/such/run")  # a no-op, not an error
