"""Figures of a study, drawn from ``tune.json`` alone (matplotlib, no Optuna, no pyplot).

The same functions write ``OUT/plots/*.png`` and draw the report's tuning section, so
the report can be rebuilt from the files. Optuna's own plots need plotly; these do not.
"""

from __future__ import annotations

from typing import Any

from lensforge.report.plots import DPI, VAL_COLOR, WIDTH_IN, to_png

COMPLETE_COLOR, PRUNED_COLOR, FRONT_COLOR, BEST_COLOR = "#3b6ea8", "#b0b0b0", "#e07b39", "#d62728"
AXIS_LABELS = {"accuracy": "val accuracy (%)", "latency_ms": "p50 latency (ms, batch 1)", "size_mb": "model.onnx (MB)"}


def all_plots(summary: dict[str, Any]) -> dict[str, bytes]:
    """name -> PNG: history always; importances and the Pareto front when there is something to show."""
    found = {"history": history_png(summary)}
    if summary.get("importances"):
        found["importances"] = importances_png(summary)
    if len(summary.get("objectives", [])) > 1 and summary.get("pareto"):
        found["pareto"] = pareto_png(summary)
    return found


def _figure(height_in: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _tidy(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, color="#e3e3e3", linewidth=0.6)
    ax.set_axisbelow(True)


def history_png(summary: dict[str, Any]) -> bytes:
    """Val accuracy per trial (pruned trials at the epoch they stopped), with the best so far."""
    trials = summary["trials"]
    fig, ax = _figure(3.2)
    for state, color, marker, label in (("COMPLETE", COMPLETE_COLOR, "o", "complete"),
                                        ("PRUNED", PRUNED_COLOR, "x", "pruned (when stopped)")):
        points = [(t["number"], 100 * t["values"]["accuracy"]) for t in trials
                  if t["state"] == state and t["values"].get("accuracy") is not None]
        if points:
            ax.scatter(*zip(*points), color=color, marker=marker, s=22, label=label, zorder=3)
    complete = sorted((t["number"], 100 * t["values"]["accuracy"]) for t in trials
                      if t["state"] == "COMPLETE" and t["values"].get("accuracy") is not None)
    if complete:
        best, steps = -1.0, []
        for number, acc in complete:
            best = max(best, acc)
            steps.append((number, best))
        steps.append((max(t["number"] for t in trials), best))  # held to the last trial
        ax.step(*zip(*steps), where="post", color=VAL_COLOR, linewidth=1.4, label="best so far")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(AXIS_LABELS["accuracy"])
    ax.set_title("Optimisation history")
    _tidy(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", frameon=False, fontsize=8)
    return to_png(fig)


def importances_png(summary: dict[str, Any]) -> bytes:
    """fANOVA importance of each parameter for val accuracy, largest on top."""
    ranked = sorted(summary["importances"].items(), key=lambda item: item[1])
    fig, ax = _figure(0.6 + 0.28 * len(ranked))
    ax.barh([name for name, _ in ranked], [value for _, value in ranked], color=COMPLETE_COLOR)
    ax.set_xlabel("importance for val accuracy (fANOVA, sums to 1)")
    ax.set_title("Parameter importances")
    _tidy(ax)
    return to_png(fig)


def pareto_png(summary: dict[str, Any]) -> bytes:
    """Val accuracy against the second objective; the Pareto front joined, the pick marked."""
    x_name = summary["objectives"][1]
    trials = [t for t in summary["trials"] if t["state"] == "COMPLETE"
              and t["values"].get(x_name) is not None and t["values"].get("accuracy") is not None]
    fig, ax = _figure(3.4)
    rest = [(t["values"][x_name], 100 * t["values"]["accuracy"]) for t in trials if not t["pareto"]]
    front = sorted((t["values"][x_name], 100 * t["values"]["accuracy"]) for t in trials if t["pareto"])
    if rest:
        ax.scatter(*zip(*rest), color=COMPLETE_COLOR, s=20, alpha=0.7, label="trial")
    if front:
        ax.plot(*zip(*front), color=FRONT_COLOR, marker="o", markersize=5, linewidth=1.4, label="Pareto front")
    best = (summary.get("best") or {}).get("values")
    if best:
        ax.scatter([best[x_name]], [100 * best["accuracy"]], s=90, facecolors="none", edgecolors=BEST_COLOR,
                   linewidths=1.6, label="best (most accurate on the front)", zorder=4)
    ax.set_xlabel(AXIS_LABELS.get(x_name, x_name))
    ax.set_ylabel(AXIS_LABELS["accuracy"])
    ax.set_title("Pareto front" + (" (other objectives in tune.json)" if len(summary["objectives"]) > 2 else ""))
    _tidy(ax)
    ax.legend(loc="lower right", frameon=False, fontsize=8)
    return to_png(fig)
