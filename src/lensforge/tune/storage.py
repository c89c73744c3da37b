"""Where a study lives, and how trials of a process that died are cleaned up.

By default a journal file (``OUT/study.journal``): safe for several processes on one
machine, nothing to install. ``--storage`` takes any SQLAlchemy URL (``sqlite:///x.db``
for one machine and one process at a time; PostgreSQL or MySQL for many machines) or
another journal file path. optuna-dashboard reads either.

Stale trials: every trial records the host and process id that runs it. When a process
starts, RUNNING trials of a process on this host that no longer exists are marked FAIL
(with ``stale`` in their user attributes), so a killed tune resumes cleanly. Trials of
other hosts are left alone, except on an RDB storage, where Optuna's heartbeat fails
those silent for longer than the grace period.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from lensforge.errors import UsageError

JOURNAL_NAME = "study.journal"
HEARTBEAT_INTERVAL_S = 60  # RDB only: a trial of another machine silent for GRACE_PERIOD_S is failed
GRACE_PERIOD_S = 300


def open_storage(url: str | None, out_dir: Path) -> tuple[Any, str]:
    """The Optuna storage for ``url`` (None: the journal file in ``out_dir``), and how to name it to people."""
    import optuna

    if url is None or "://" not in url:
        path = Path(url) if url is not None else out_dir / JOURNAL_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
        except OSError as e:
            raise UsageError(f"--storage '{path}' cannot be opened: {e.strerror or e}") from None
        return optuna.storages.JournalStorage(backend), str(path)
    shown = _hide_password(url)
    try:
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                             grace_period=GRACE_PERIOD_S)
    except Exception as e:  # SQLAlchemy raises many kinds (bad URL, missing driver, no server, no file)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--storage '{shown}' cannot be opened: {reason}") from None
    return storage, shown


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: the error that follows says so
        return url


def mark_owner(trial: Any) -> None:
    """Record who runs ``trial``, so a later process can tell whether it is still alive."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())


def fail_stale_trials(study: Any) -> list[int]:
    """Mark FAIL the RUNNING trials whose process is gone; return their numbers."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)  # RDB heartbeat (other machines); a no-op elsewhere
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != host or _alive(attrs.get("pid")):
            continue
        storage = study._storage  # the public Study API cannot change another trial's state
        try:
            storage.set_trial_user_attr(trial._trial_id, "stale", f"process {attrs.get('pid')} ended mid-trial")
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process failed it first
    return failed


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True  # unknown owner (killed before it wrote its pid): leave it
    if pid == os.getpid():
        return False  # our own id on a trial we are not running: an earlier process had it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
