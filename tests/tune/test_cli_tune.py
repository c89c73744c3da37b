"""`lensforge tune` through the console entry point: bad input, a killed process resumed, the install hint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import LENSFORGE, run, wait_for

TINY_ARGS = ("--data", "builtin:digits", "--model", "tinycnn_xs", "--epochs", "2", "--max-train-batches", "2")


@pytest.mark.parametrize(("args", "message"), [
    (("--objectives", "accuracy,latncy_ms"), "unknown objective 'latncy_ms'; did you mean latency_ms?"),
    (("--storage", "nosuchdb://host/x"), "--storage 'nosuchdb://host/x' cannot be opened"),
    (("--storage", "sqlite:////no/such/folder/x.db"), "cannot be opened"),
    (("--model", "tinycnn_xxs"), "unknown model 'tinycnn_xxs'; did you mean"),
    (("--trials", "0"), "--trials: 0 is not at least 1"),
    (("--timeout", "soon"), "--timeout: 'soon' is not a duration"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = run("tune", "--data", "builtin:digits", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_killed_tune_resumes_from_its_storage(tmp_path):
    """SIGKILL while trial 1 trains; the rerun fails that trial as stale and completes the study."""
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    args = ["tune", *TINY_ARGS, "--trials", "3", "--storage", storage, "--study", "killed", "--out",
            str(tmp_path / "out"), "--pruner", "none"]
    process = subprocess.Popen([LENSFORGE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _complete_rows(tmp_path / "out") >= 1 or process.poll() is not None, timeout_s=600,
                 what="the first trial to complete")
        wait_for(lambda: _running(storage) or process.poll() is not None, timeout_s=600, what="trial 1 to start")
        assert process.poll() is None, "the tune ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    cut_short = [t.number for t in _trials(storage) if t.state.name == "RUNNING"]
    assert cut_short, "killed between trials: nothing was left running"

    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = _trials(storage)
    numbers = [t.number for t in trials]
    assert numbers == sorted(set(numbers))  # no number twice
    assert sum(t.state.name == "COMPLETE" for t in trials) == 3  # the stale trial does not count toward --trials
    for trial in trials:
        if trial.number in cut_short:
            assert trial.state.name == "FAIL" and "stale" in trial.user_attrs
    assert all(t.state.name != "RUNNING" for t in trials)
    assert (tmp_path / "out" / "best" / "bundle" / "manifest.json").is_file()
    assert "best config:" in result.stdout
    assert f"marked FAIL the trials left running by a process that ended: {cut_short}" in result.stderr


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="killed", storage=storage).trials


def _running(storage: str) -> bool:
    try:
        return any(t.state.name == "RUNNING" for t in _trials(storage))
    except Exception:  # sqlite busy while the tune writes: look again
        return False


def _complete_rows(out: Path) -> int:
    """COMPLETE rows in trials.csv, which the tune rewrites (atomically) after every trial."""
    try:
        lines = (out / "trials.csv").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(line.split(",")[1] == "COMPLETE" for line in lines[1:])


def test_without_optuna_the_command_says_which_extra_to_install(tmp_path):
    code = ("import sys\n"
            "sys.modules['optuna'] = None  # as where the tune extra is not installed\n"
            "sys.argv = ['lensforge', 'tune', '--data', 'builtin:digits', '--out', sys.argv[1]]\n"
            "from lensforge.cli import main\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "pip install 'lensforge[tune]'" in result.stderr and "Traceback" not in result.stderr
    assert not Path(tmp_path / "out").exists()
