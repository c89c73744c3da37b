"""Figures of the Robustness section: corruption heatmap, epsilon curves, OOD histograms,
risk-coverage and adaptation bars. PNG bytes, drawn without pyplot (see plots.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lensforge.report.plots import _styled_figure, floats, to_png

SERIES = ("#3b6ea8", "#e07b39", "#5a9e6f", "#8c6bb1", "#c4a000", "#6b6b6b", "#d62728")


def corruption_heatmap(names: Sequence[str], severities: Sequence[str], accuracy: np.ndarray,
                       clean_accuracy: float | None, metric: str = "Accuracy") -> bytes:
    """``metric`` (accuracy, or a detector's mAP) in % per corruption (rows) and severity (columns)."""
    rows = len(names)
    with _styled_figure(max(2.2, 0.24 * rows + 1.2), 5.6) as fig:
        ax = fig.add_subplot()
        image = ax.imshow(accuracy * 100, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(severities)), [f"s{s}" for s in severities])
        ax.set_yticks(range(rows), list(names))
        ax.grid(False)
        for (i, j), value in np.ndenumerate(accuracy):
            if np.isfinite(value):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if 0.25 < value < 0.85 else "white")
        title = f"{metric} under corruption (%)"
        if clean_accuracy is not None:
            title += f" — clean {100 * clean_accuracy:.1f}%"
        ax.set_title(title)
        ax.set_xlabel("severity")
        fig.colorbar(image, ax=ax, shrink=0.8, label=f"{metric.lower()} (%)")
        return to_png(fig)


def epsilon_curves(curves: dict[str, dict[str, Any]]) -> bytes:
    """Robust accuracy against epsilon, one line per attack; L-inf and L2 on separate panels."""
    by_norm: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, curve in curves.items():
        by_norm.setdefault(str(curve.get("norm", "linf")), []).append((name, curve))
    panels = sorted(by_norm, key=lambda n: n != "linf")
    with _styled_figure(3.0, 3.4 * len(panels) + 0.4) as fig:
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, norm in zip(axes, panels):
            for i, (name, curve) in enumerate(by_norm[norm]):
                eps, acc = floats(curve.get("epsilons") or []), floats(curve.get("robust_accuracy") or [])
                scale = 255 if norm == "linf" else 1
                ax.plot(eps * scale, acc * 100, marker="o", markersize=3, color=SERIES[i % len(SERIES)], label=name)
            ax.set(xlabel="epsilon (/255)" if norm == "linf" else "epsilon (L2, [0,1] pixels)",
                   ylabel="robust accuracy (%)", ylim=(-2, 102), title=f"{'L∞' if norm == 'linf' else 'L2'} attacks")
            ax.legend()
        return to_png(fig)


def score_histograms(histograms: dict[str, dict[str, Any]], threshold: float | None, detector: str) -> bytes:
    """Detector scores of in-distribution vs each OOD set, as step histograms on shared bins."""
    with _styled_figure(3.0) as fig:
        ax = fig.add_subplot()
        for i, (name, hist) in enumerate(histograms.items()):
            edges, counts = floats(hist.get("edges") or []), floats(hist.get("counts") or [])
            if len(edges) != len(counts) + 1 or counts.sum() <= 0:
                continue
            density = counts / counts.sum()
            ax.stairs(density, edges, color=SERIES[i % len(SERIES)], label=name, linewidth=1.4,
                      fill=name.startswith("in"), alpha=0.35 if name.startswith("in") else 1.0)
        if threshold is not None:
            ax.axvline(threshold, color="#c62828", linestyle="--", linewidth=1, label="threshold")
        ax.set(xlabel=f"{detector} score (higher = more out-of-distribution)", ylabel="share of images",
               title=f"OOD scores ({detector})")
        ax.legend(ncols=2)
        return to_png(fig)


def risk_coverage(coverage: Sequence[Any], risk: Sequence[Any], chosen: tuple[float, float] | None) -> bytes:
    """Error rate of the accepted images against the share accepted, as the threshold rises."""
    cov, rsk = floats(coverage), floats(risk)
    with _styled_figure(2.8, 4.6) as fig:
        ax = fig.add_subplot()
        ax.plot(cov * 100, rsk * 100, color=SERIES[0])
        if chosen is not None:
            ax.scatter([chosen[0] * 100], [chosen[1] * 100], color="#c62828", zorder=3,
                       label=f"abstain threshold: {chosen[0]:.0%} covered, {chosen[1]:.1%} error")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncols=1)
        ax.set(xlabel="coverage (%)", ylabel="error on accepted (%)", xlim=(0, 101), title="Risk-coverage")
        return to_png(fig)


def before_after_bars(labels: Sequence[str], before: Sequence[Any], after: Sequence[Any], title: str,
                      ylabel: str = "accuracy (%)") -> bytes:
    """Paired bars: before (grey) and after (blue) per label."""
    b, a = floats(before), floats(after)
    x = np.arange(len(labels))
    with _styled_figure(2.8, max(3.6, 1.0 * len(labels) + 1.6)) as fig:
        ax = fig.add_subplot()
        ax.bar(x - 0.2, b * 100, width=0.38, color="#aab4bf", label="before")
        ax.bar(x + 0.2, a * 100, width=0.38, color=SERIES[0], label="after")
        for xs, values in ((x - 0.2, b), (x + 0.2, a)):
            for xi, v in zip(xs, values):
                if np.isfinite(v):
                    ax.text(xi, v * 100 + 1, f"{100 * v:.0f}", ha="center", fontsize=7)
        ax.set_xticks(x, list(labels))
        ax.set(ylim=(0, 110), ylabel=ylabel, title=title)
        ax.legend(loc="lower right")
        return to_png(fig)
