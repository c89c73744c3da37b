"""Optional experiment tracking on MLflow: ``--mlflow URI`` on ``lensforge train`` and ``autopilot``.

Why MLflow: it is the open-source tracker (Apache-2.0) teams most often already run, and its
UI compares many runs side by side by their parameters and metrics, which the per-run
TensorBoard logs (``--tensorboard``, kept as they are) do not. The same client writes to a
local folder (a path or ``file:`` URI, no server), a database (``sqlite:///mlflow.db``) or a
tracking server (``http(s)://``), so a laptop run and a team server are one flag apart.

What is logged, into one MLflow run per lensforge run (experiment ``lensforge``, or
``MLFLOW_EXPERIMENT_NAME``; run name: the run folder's name):

- params: the resolved training config (``RUN/config.yaml``'s keys), and the "auto" choices
  as ``resolved.*`` (model, lr, batch size, image size, ...);
- metrics: every epoch's row of ``RUN/metrics.jsonl`` (losses, accuracies, lr, images/s) at
  step = epoch, live through ``train(on_epoch_end=...)``; ``best_val_acc`` at the end;
  for autopilot also the shipped bundle's test numbers (``test_accuracy``, ``test_ece``, ...);
- artifacts: the run folder's small files under ``run/`` (config, metrics, diagnosis, health,
  report; not checkpoints), and for autopilot the bundle directory under ``bundle/`` and
  ``summary.json``.

Tracking is a side channel: the store is opened (and a bad URI refused, exit 2) before any
work starts; a failure to log later is reported once and the run goes on without it.
MLflow is imported only here, on first use (the ``tracking`` extra).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.console import Console
from rich.markup import escape

from lensforge.errors import UsageError

DEFAULT_EXPERIMENT = "lensforge"  # MLflow's own MLFLOW_EXPERIMENT_NAME overrides it
RUN_FILES = ("config.yaml", "metrics.jsonl", "run.json", "diagnosis.json", "health.json", "report.html")
# Opening the store is one try of at most this many seconds: MLflow's default for a server is
# 7 retries with exponential back-off (minutes) before a mistyped --mlflow URI is reported.
OPEN_TIMEOUT_S = 10
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value (since 2.x); training options are far shorter
MAX_BATCH_PARAMS = 100  # MLflow's limit on params per log_batch call
EpochCallback = Callable[[dict[str, Any]], None]


def import_mlflow() -> Any:
    """MLflow, or ``ModuleNotFoundError(name="mlflow")``: the CLI turns it into the install hint."""
    try:
        import mlflow
    except ModuleNotFoundError as e:
        if e.name != "mlflow":
            raise
        raise ModuleNotFoundError("No module named 'mlflow'", name="mlflow") from None
    return mlflow


class Tracker:
    """One MLflow run to log to. Every method does nothing when tracking is off or has failed."""

    def __init__(self, client: Any = None, run_id: str | None = None, console: Console | None = None) -> None:
        self._client, self.run_id = client, run_id
        self._console = console or Console(stderr=True)
        self._params_logged = False
        self._epochs_logged: set[int] = set()

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def epoch_callback(self) -> EpochCallback | None:
        """For ``train(on_epoch_end=...)``: None when off, so training runs exactly as without tracking."""
        return self.on_epoch_end if self.enabled else None

    def log_config(self, cfg: Any) -> None:
        """The resolved training config (a :class:`~lensforge.train.config.TrainConfig`) as params, once."""
        if self.enabled and not self._params_logged:
            self._params_logged = self.log_params(cfg.model_dump(mode="json"))

    def log_params(self, params: dict[str, Any], prefix: str = "") -> bool:
        from mlflow.entities import Param

        items = [Param(f"{prefix}{key}", _param_text(value)) for key, value in params.items()]
        chunks = [items[i:i + MAX_BATCH_PARAMS] for i in range(0, len(items), MAX_BATCH_PARAMS)]
        return all(self._safely("logging params", lambda c, chunk=chunk: c.log_batch(self.run_id, params=chunk))
                   for chunk in chunks)

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        """The numbers among ``metrics`` (bools, strings and None are left out)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items() if _is_number(value)]
        if items:
            self._safely("logging metrics", lambda c: c.log_batch(self.run_id, metrics=items))

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        """One epoch's metrics row at step = epoch (the callback ``train`` calls after each epoch)."""
        epoch = int(row["epoch"])
        if self.enabled and epoch not in self._epochs_logged:
            self.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=epoch)
            self._epochs_logged.add(epoch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            if value is not None:
                self._safely("setting tags", lambda c, k=key, v=value: c.set_tag(self.run_id, k, _param_text(v)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._safely(f"uploading {path}", lambda c: c.log_artifacts(self.run_id, str(path), artifact_path))
        elif path.is_file():
            self._safely(f"uploading {path}", lambda c: c.log_artifact(self.run_id, str(path), artifact_path))

    def log_run(self, run_dir: str | Path) -> None:
        """After training: the config (if not yet logged), the "auto" choices, any epoch not logged live
        (a resumed run's earlier epochs, a multi-process run's), ``best_val_acc`` and the run's small files."""
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        info = _read_json(run_dir / "run.json")
        if not self._params_logged:
            self._params_logged = self.log_params(_read_yaml(run_dir / "config.yaml"))
        self.log_params({"model": info.get("model"), **(info.get("resolved") or {})}, prefix="resolved.")
        for row in _read_jsonl(run_dir / "metrics.jsonl"):
            self.on_epoch_end(row)
        self.log_metrics({"best_val_acc": info.get("best_val_acc")}, step=int(info.get("best_epoch") or 0))
        for name in RUN_FILES:
            self.log_artifact(run_dir / name, "run")

    def log_autopilot(self, summary: dict[str, Any], out_dir: Path) -> None:
        """An autopilot result: its run, test numbers of the shipped bundle, the bundle and summary.json."""
        if not self.enabled:
            return
        run_dir = Path(summary["run"])
        self.log_run(run_dir)
        test = summary["metrics"]["test"]
        guardrails, tune = summary.get("guardrails") or {}, summary.get("tune") or {}
        self.log_metrics({**{f"test_{key}": value for key, value in test.items()},
                          "mean_corruption_error": guardrails.get("mean_corruption_error"),
                          "time_total_s": summary["timings_s"].get("total")})
        self.set_tags({"lensforge.at_chance": summary.get("at_chance"), "lensforge.model": summary.get("model"),
                       "lensforge.tune.adopted": tune.get("adopted"), "lensforge.tune.reason": tune.get("reason")})
        self.log_artifact(summary["bundle"], "bundle")
        self.log_artifact(out_dir / "summary.json")
        if run_dir.resolve() != Path(out_dir).resolve():  # a budgeted run ships a candidate's bundle and report
            self.log_artifact(out_dir / "report.html")

    def end(self, status: str) -> None:
        """Mark the MLflow run FINISHED, FAILED or KILLED (best effort: the store may be gone)."""
        # a tracking server's client prints the run's address on stdout, which holds our results: to stderr
        with contextlib.redirect_stdout(sys.stderr):
            self._safely("ending the run", lambda c: c.set_terminated(self.run_id, status=status))

    def _safely(self, what: str, call: Callable[[Any], object]) -> bool:
        """Run ``call(client)``; on failure say so once and stop tracking (the run goes on)."""
        if self._client is None:
            return False
        try:
            call(self._client)
        except Exception as e:  # noqa: BLE001  (any store or network failure: tracking is a side channel)
            self._console.print(f"[yellow]MLflow:[/] {what} failed ({escape(_first_line(e))}); "
                                "tracking stopped, the run goes on", highlight=False, soft_wrap=True)
            self._client = None
            return False
        return True


@contextlib.contextmanager
def mlflow_tracking(uri: str | None, *, run_name: str, command: str,
                    console: Console | None = None) -> Iterator[Tracker]:
    """A :class:`Tracker` on a new MLflow run at ``uri`` for the body; a do-nothing one when ``uri`` is None.

    The run ends FINISHED, FAILED (the body raised) or KILLED (Ctrl-C).

    Raises:
        UsageError: the URI cannot be opened (unknown scheme, unreachable server, unwritable folder).
        ModuleNotFoundError: MLflow is not installed (``pip install 'lensforge[tracking]'``).
    """
    if uri is None:
        yield Tracker(console=console)
        return
    import_mlflow()
    with _mlflow_settings(uri):
        tracker = Tracker(*_start_run(uri, run_name, command), console=console)
        status = "FAILED"
        try:
            yield tracker
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracker.end(status)


def _start_run(uri: str, run_name: str, command: str) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    from lensforge import __version__

    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    one_quick_try = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(OPEN_TIMEOUT_S)}
    try:
        with _env_defaults(one_quick_try):
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
            tags = {"lensforge.command": command, "lensforge.version": __version__}
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    except Exception as e:  # noqa: BLE001  (whatever the store raises, the URI is what the user can fix)
        raise UsageError(f"--mlflow {uri!r} cannot be opened: {_open_error(uri, e)}") from None
    return client, run.info.run_id


def _open_error(uri: str, error: Exception) -> str:
    """Why the store did not open, in a few words (MLflow's own messages run to several hundred characters)."""
    text = " ".join(str(error).split())
    if "unsupported URI" in text:  # MLflow's registry lookup: no store for this scheme
        return (f"MLflow has no tracking store for '{urlparse(uri).scheme}:' URIs (use a folder, file:, "
                "sqlite:///, postgresql://, mysql:// or http(s)://)")
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    network = re.search(r"Connection refused|Name or service not known|Temporary failure in name resolution|"
                        r"No route to host|timed out|Network is unreachable", text)
    if network:
        return f"no tracking server answers there ({network.group(0).lower()})"
    return _first_line(error)


@contextlib.contextmanager
def _mlflow_settings(uri: str) -> Iterator[None]:
    """MLflow as asked for, quietly, for the run's duration (each setting restored afterwards).

    A folder or ``file:`` URI is MLflow's file store, which recent MLflow releases keep behind an
    opt-in (``MLFLOW_ALLOW_FILE_STORE``): asking for it by URI is that opt-in. MLflow's INFO logs
    (database set-up) and its dependencies' deprecation warnings would drown our progress lines.
    """
    scheme = urlparse(uri).scheme
    file_store = scheme in ("", "file") or len(scheme) == 1  # a bare path (with a drive letter on Windows)
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with _env_defaults({"MLFLOW_ALLOW_FILE_STORE": "true"} if file_store else {}), warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning):  # MLflow's and its stores', not the training's
                warnings.filterwarnings("ignore", category=category, module=r"(mlflow|sqlalchemy|alembic)\b")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _env_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set the environment variables the user has not set, for the body only."""
    added = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_CHARS]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    from lensforge.train.config import load_config_file

    return load_config_file(path) if path.is_file() else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]
