"""The report's "Tuning" section, from ``tune.json`` in the folder reported on.

``lensforge tune`` writes ``OUT/tune.json`` (shown in ``OUT/report.html``) and copies it
into the best run (``OUT/best/report.html``). Import this module before
:func:`lensforge.report.write_report` for the section to appear; it imports neither
torch nor Optuna.
"""

from __future__ import annotations

from typing import Any

from lensforge.report import Block, Figure, Section, Stat, Stats, Table, Text, register_section
from lensforge.report.formatting import fmt_percent, fmt_seconds
from lensforge.report.runfiles import RunFiles
from lensforge.tune import plots

SECTION_ORDER = 85  # after what the run did (evaluation 40, deployment 45, bundle 50), before its config (90)
MAX_ROWS = 30


@register_section("tuning", order=SECTION_ORDER)
def tuning_section(run: RunFiles) -> Section | None:
    summary = run.json("tune.json")
    if not isinstance(summary, dict) or not summary.get("trials"):
        return None
    best, counts = summary.get("best") or {}, summary.get("counts", {})
    blocks: list[Block] = [
        Text(f"Study '{summary['study']}' ({', '.join(summary['objectives'])}) on {summary['data']}: "
             f"{summary['epochs']} epochs per trial, seed {summary['seed']}, storage {summary['storage']}. "
             "Trials are scored on the validation split through their ONNX bundle; the test split is "
             "used once, for the best configuration."),
        Stats([
            Stat("Trials", str(sum(counts.values())), note=f"{counts.get('COMPLETE', 0)} complete, "
                 f"{counts.get('PRUNED', 0)} pruned, {counts.get('FAIL', 0)} failed"),
            Stat("Best trial", str(best.get("trial", "-")), note="most accurate on the Pareto front"
                 if summary.get("pareto") else "highest val accuracy"),
            Stat("Best val accuracy", fmt_percent((best.get("values") or {}).get("accuracy"))),
            Stat("Best test accuracy", fmt_percent((best.get("test") or {}).get("accuracy")),
                 note="through the bundle", tone="bad" if (best.get("test") or {}).get("at_chance") else ""),
            Stat("Wall time", fmt_seconds(summary.get("wall_s")), note="of the process that wrote this"),
        ]),
        Figure(plots.history_png(summary), alt="val accuracy per trial", width_px=700),
    ]
    if summary.get("importances"):
        blocks.append(Figure(plots.importances_png(summary), alt="parameter importances", width_px=700))
    if len(summary["objectives"]) > 1 and summary.get("pareto"):
        blocks.append(Figure(plots.pareto_png(summary), alt="Pareto front", width_px=700))
    blocks.append(_trials_table(summary))
    return Section("Tuning", blocks)


def _trials_table(summary: dict[str, Any]) -> Table:
    objectives = summary["objectives"]
    names = sorted({name for t in summary["trials"] for name in t["params"]})
    ranked = sorted(summary["trials"], key=lambda t: (t["state"] != "COMPLETE", -(t["values"].get("accuracy") or 0)))
    rows, highlight = [], []
    for i, t in enumerate(ranked[:MAX_ROWS]):
        if t["number"] == (summary.get("best") or {}).get("trial"):
            highlight.append(i)
        rows.append([str(t["number"]), t["state"].lower() + (" (front)" if t.get("pareto") else ""),
                     *(_value(o, t["values"].get(o)) for o in objectives),
                     *(_param(t["params"].get(n)) for n in names), fmt_seconds(t.get("duration_s"))])
    numeric = (0, *range(2, 2 + len(objectives)))
    caption = f"Trials by val accuracy (best highlighted{'; first ' + str(MAX_ROWS) if len(ranked) > MAX_ROWS else ''})"
    return Table(("trial", "state", *objectives, *names, "time"), rows, caption=caption, numeric=numeric,
                 highlight=highlight)


def _value(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return fmt_percent(value) if name == "accuracy" else f"{value:.3g}"


def _param(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
