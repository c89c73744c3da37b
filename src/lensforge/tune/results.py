"""What a study leaves behind: trials.csv, tune.json, best.yaml, OUT/best, plots and reports.

Written by whichever process finishes (several may share a study; each writes the whole
study as it stands). The best trial is the most accurate one that completed; with several
objectives, the most accurate on the Pareto front (the front itself is in ``tune.json``).
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from lensforge.errors import LensforgeError
from lensforge.tune.config import TuneConfig
from lensforge.tune.objectives import objective
from lensforge.utils.io import atomic_write_json, atomic_write_text, replace_dir, staging_dir

SUMMARY_FILE = "tune.json"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best.yaml"
BEST_RUN = "best"
PLOTS_DIR = "plots"


@dataclass
class TrialRecord:
    """One trial as people read it: a row of trials.csv and of tune.json."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    values: dict[str, float | None]  # by objective; a pruned trial: its last reported val accuracy
    params: dict[str, Any]
    epochs: int | None
    duration_s: float | None
    run_dir: str | None
    error: str | None = None
    pareto: bool = False


def trial_record(trial: Any, objectives: tuple[str, ...]) -> TrialRecord:
    values: list[float | None] = list(trial.values) if trial.values is not None else [None] * len(objectives)
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        values[0] = trial.intermediate_values[max(trial.intermediate_values)]
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    attrs = trial.user_attrs
    return TrialRecord(trial.number, trial.state.name, dict(zip(objectives, values)), dict(trial.params),
                       attrs.get("epochs"), None if duration is None else round(duration, 2), attrs.get("run_dir"),
                       attrs.get("error") or attrs.get("stale"))


def trial_line(trial: Any, objectives: tuple[str, ...]) -> str:
    """One line per finished trial for the console."""
    r = trial_record(trial, objectives)
    where = f"trial {r.number}"
    if r.state == "COMPLETE":
        scores = ", ".join(format_value(name, r.values[name]) for name in objectives)
        return f"{where}: {scores}  ({describe_params(r.params)}; {r.duration_s or 0:.0f}s)"
    if r.state == "PRUNED":
        return (f"{where}: pruned after epoch {r.epochs} ({format_value('accuracy', r.values['accuracy'])}; "
                f"{describe_params(r.params)})")
    return f"{where}: {r.state.lower()}: {r.error or 'no reason recorded'}"


def format_value(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return {"accuracy": f"val acc {value:.1%}", "latency_ms": f"{value:.3g} ms", "size_mb": f"{value:.2f} MB"}.get(
        name, f"{name} {value:.4g}")


def describe_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def write_trials_csv(study: Any, objectives: tuple[str, ...], out_dir: Path) -> Path:
    """number, state, one column per objective and per parameter, epochs, duration, run folder, error."""
    records = [trial_record(t, objectives) for t in study.get_trials(deepcopy=False)]
    params = sorted({name for r in records for name in r.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["number", "state", *objectives, *(f"params_{p}" for p in params), "epochs", "duration_s",
                     "run_dir", "error"])
    for r in records:
        writer.writerow([r.number, r.state, *(_cell(r.values[o]) for o in objectives),
                         *(_cell(r.params.get(p)) for p in params), _cell(r.epochs), _cell(r.duration_s),
                         r.run_dir or "", r.error or ""])
    return atomic_write_text(out_dir / TRIALS_CSV, buffer.getvalue())


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------- the end of a study


@dataclass
class TuneResult:
    """A finished study: the folder, ``tune.json``'s content, and the best artifacts."""

    out: Path
    summary: dict[str, Any]
    best_config: Path
    best_run: Path
    report: Path

    @property
    def bundle(self) -> Path:
        return self.best_run / "bundle"

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.summary["trials"]

    @property
    def test_accuracy(self) -> float:
        return self.summary["best"]["test"]["accuracy"]

    def table(self, top: int = 8) -> Any:
        """The best trials (then the rest by number) as a table that fits 80 columns."""
        from rich.table import Table

        objectives = self.summary["objectives"]
        best = self.summary["best"]["trial"]
        table = Table(title=f"study '{self.summary['study']}': top trials by val accuracy")
        for name in ("trial", "state", *(_SHORT[o] for o in objectives), "model", "px", "lr", "augment"):
            table.add_column(name, no_wrap=True, justify="left" if name in ("state", "model", "augment") else "right")
        ranked = sorted(self.trials, key=lambda t: (t["state"] != "COMPLETE", -(t["values"]["accuracy"] or 0)))
        for t in ranked[:top]:
            p = t["params"]
            mark = " *" if t["number"] == best else ""
            table.add_row(f"{t['number']}{mark}", t["state"].lower(),
                          *(_short_value(o, t["values"][o]) for o in objectives), str(p.get("model", "")),
                          str(p.get("image_size", "")), f"{p['lr']:.2g}" if "lr" in p else "",
                          str(p.get("augment", "")))
        return table

    def summary_lines(self) -> list[str]:
        s, best = self.summary, self.summary["best"]
        counts = s["counts"]
        lines = [f"{sum(counts.values())} trials: {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} "
                 f"pruned, {counts.get('FAIL', 0)} failed (* = best; all in {self.out / TRIALS_CSV})",
                 f"best: trial {best['trial']}, val accuracy {best['values']['accuracy']:.2%}, test accuracy "
                 f"{best['test']['accuracy']:.2%} (through the bundle)"]
        if s.get("pareto"):
            lines.append(f"Pareto front ({', '.join(s['objectives'])}): trials {', '.join(map(str, s['pareto']))}")
        if best["test"].get("at_chance"):
            lines.append("warning: the best model scores at chance level on the test split")
        lines += [f"best config: {self.best_config}  (lensforge train --config {self.best_config})",
                  f"bundle: {self.bundle}", f"report: {self.report}"]
        return lines


_SHORT = {"accuracy": "val acc", "latency_ms": "p50 ms", "size_mb": "MB"}


def _short_value(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    shown = {"accuracy": f"{value:.1%}", "latency_ms": f"{value:.3f}", "size_mb": f"{value:.2f}"}
    return shown.get(name, f"{value:.3g}")


def finish(study: Any, cfg: TuneConfig, *, out_dir: Path, study_name: str, storage_name: str, console: Console,
           started: float) -> TuneResult:
    """Write everything about the study; train-or-reuse, export and test the best configuration."""
    from lensforge.report import write_report
    from lensforge.tune import section  # noqa: F401  (registers the report's tuning section)

    write_trials_csv(study, cfg.objectives, out_dir)
    records = [trial_record(t, cfg.objectives) for t in study.get_trials(deepcopy=False)]
    best = _best_trial(study, cfg)
    pareto = {t.number for t in study.best_trials} if cfg.multi_objective and best is not None else set()
    for r in records:
        r.pareto = r.number in pareto
    summary = _summary(cfg, study_name, storage_name, out_dir, records, sorted(pareto), _importances(study, cfg))
    if best is None:
        atomic_write_json(out_dir / SUMMARY_FILE, {**summary, "wall_s": round(time.perf_counter() - started, 1)})
        raise LensforgeError(f"no trial of study '{study_name}' completed ({_count_text(summary['counts'])}); "
                             f"see {out_dir / TRIALS_CSV}")
    console.print(f"best: trial {best.number}; training its configuration into {out_dir / BEST_RUN} ...")
    best_dir, reused = _best_run(best, cfg, out_dir, study_name)
    summary["best"] = _best_entry(best, cfg, best_dir, out_dir, reused)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    summary["plots"] = _write_plots(summary, out_dir)
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    shutil.copyfile(out_dir / SUMMARY_FILE, best_dir / SUMMARY_FILE)  # the best run's report shows the study
    write_report(best_dir)
    return TuneResult(out_dir, summary, out_dir / BEST_CONFIG, best_dir, write_report(out_dir))


def _count_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state.lower()}" for state, n in counts.items()) or "no trials"


def _best_trial(study: Any, cfg: TuneConfig) -> Any:
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return None
    if not cfg.multi_objective:
        return study.best_trial
    # the most accurate on the front; ties: better on the next objectives, then the earlier trial
    return max(study.best_trials, key=lambda t: (t.values[0], *(-v for v in t.values[1:]), -t.number))


def _importances(study: Any, cfg: TuneConfig) -> dict[str, float]:
    """fANOVA importance of each parameter for val accuracy ({} with fewer than 2 completed trials)."""
    import optuna

    if sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)) < 2:
        return {}
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=cfg.seed),
            target=(lambda t: t.values[0]) if cfg.multi_objective else None)
    except (RuntimeError, ValueError):  # e.g. no parameter varied among the completed trials
        return {}
    return {name: round(float(value), 4) for name, value in found.items()}


def _summary(cfg: TuneConfig, study_name: str, storage_name: str, out_dir: Path, records: list[TrialRecord],
             pareto: list[int], importances: dict[str, float]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.state] = counts.get(r.state, 0) + 1
    return {"study": study_name, "storage": storage_name, "out": str(out_dir), "data": cfg.data, "model": cfg.model,
            "objectives": list(cfg.objectives), "directions": [objective(o).direction for o in cfg.objectives],
            "epochs": cfg.epochs, "seed": cfg.seed, "trials_requested": cfg.trials, "pruner": cfg.pruner,
            "counts": counts, "best": None, "pareto": pareto, "importances": importances,
            "trials": [asdict(r) for r in records]}


def _best_run(best: Any, cfg: TuneConfig, out_dir: Path, study_name: str) -> tuple[Path, bool]:
    """OUT/best: a copy of the best trial's run when this machine has it, else trained anew; exported."""
    from lensforge.deploy.from_run import export_run
    from lensforge.train import train
    from lensforge.train.config import dump_config, load_config_file, make_config
    from lensforge.train.run import update_run_info

    best_dir = out_dir / BEST_RUN
    trial_dir = Path(best.user_attrs.get("run_dir", ""))
    origin = {"study": study_name, "trial": best.number, "trial_run": str(trial_dir)}
    if _finished_run(trial_dir):
        tmp = staging_dir(best_dir)
        shutil.copytree(trial_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
        trial_cfg = make_config(load_config_file(tmp / "config.yaml"), where=str(trial_dir / "config.yaml"))
        atomic_write_text(tmp / "config.yaml", dump_config(trial_cfg.model_copy(update={"out": str(best_dir)})))
        update_run_info(tmp, name=best_dir.name, tuned=origin)
        replace_dir(tmp, best_dir)
        reused = True
    else:  # another machine's trial, or its folder is gone: same config, same seed, trained here
        shutil.rmtree(best_dir, ignore_errors=True)
        train(cfg.trial_config(dict(best.params), best_dir), console=Console(quiet=True), show_progress=False)
        update_run_info(best_dir, tuned=origin)
        export_run(best_dir)
        reused = False
    _write_best_config(best_dir, out_dir / BEST_CONFIG, best.number, study_name)
    return best_dir, reused


def _finished_run(run_dir: Path) -> bool:
    import json

    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("status") == "complete" and (run_dir / "bundle" / "manifest.json").is_file()


def _write_best_config(best_dir: Path, path: Path, trial: int, study_name: str) -> Path:
    """The best run's resolved config without ``out``, so `lensforge train --config` picks a fresh folder."""
    import yaml

    from lensforge.train.config import load_config_file, make_config

    values = make_config(load_config_file(best_dir / "config.yaml")).model_dump(mode="json")
    values.pop("out")
    header = (f"# best configuration of tuning study '{study_name}' (trial {trial}); run folder {best_dir}\n"
              f"# train it again with: lensforge train --config {path} --out runs/NAME\n")
    return atomic_write_text(path, header + yaml.safe_dump(values, sort_keys=False))


def _best_entry(best: Any, cfg: TuneConfig, best_dir: Path, out_dir: Path, reused: bool) -> dict[str, Any]:
    from lensforge.evaluate import evaluate

    test = evaluate(best_dir / "bundle", split="test").metrics  # the one number the study never looked at
    return {"trial": best.number, "params": dict(best.params), "values": dict(zip(cfg.objectives, best.values)),
            "test": {k: test.get(k) for k in ("accuracy", "macro_f1", "ece", "num_samples", "at_chance")},
            "run": str(best_dir), "bundle": str(best_dir / "bundle"), "config": str(out_dir / BEST_CONFIG),
            "reused_trial_run": reused}


def _write_plots(summary: dict[str, Any], out_dir: Path) -> dict[str, str]:
    from lensforge.tune import plots
    from lensforge.utils.io import atomic_write_bytes

    written = {}
    for name, png in plots.all_plots(summary).items():
        atomic_write_bytes(out_dir / PLOTS_DIR / f"{name}.png", png)
        written[name] = f"{PLOTS_DIR}/{name}.png"
    return written
