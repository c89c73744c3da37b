"""Report figures as PNG bytes, drawn on :class:`matplotlib.figure.Figure` objects.

No pyplot, so no global figure state and no GUI backend: ``Figure.savefig``
renders PNG with Agg. Figures are 7 in wide at 150 dpi and shown 700 px wide,
so they stay sharp on high-density screens and in print. Matplotlib is imported
on first use, so registering a section does not pay for it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from lensforge.report.formatting import as_float

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WIDTH_IN = 7.0  # shown at 700 px: 1 in = 100 px on screen
DPI = 150
TRAIN_COLOR, VAL_COLOR, LR_COLOR = "#3b6ea8", "#e07b39", "#6b6b6b"
# Warm colours for events, distinct from the viridis (purple→green) layer lines.
EVENT_COLORS = ("#d62728", "#ff7f0e", "#e377c2", "#8c564b", "#bcbd22")
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e3e3e3",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
}


def to_png(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes (Agg, no pyplot)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white",
                metadata={"Software": None})  # no version stamp: identical runs, identical bytes
    return buffer.getvalue()


@contextmanager
def _styled_figure(height_in: float, width_in: float = WIDTH_IN) -> Iterator[Figure]:
    """A new figure drawn under the report style (matplotlib imported on first use)."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context(_STYLE):
        yield Figure(figsize=(width_in, height_in), layout="constrained")


def floats(values: Iterable[Any]) -> np.ndarray:
    """``values`` as a float array, NaN where missing or not a number."""
    numbers = [as_float(v) for v in values]
    return np.array([math.nan if v is None else v for v in numbers], dtype=float)


def column(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """Column ``key`` of ``rows`` (e.g. metrics per epoch) as floats."""
    return floats(row.get(key) for row in rows)


def learning_curves(metrics: Sequence[dict[str, Any]], best_epoch: int | None = None) -> bytes:
    """Loss and accuracy (train, val) per epoch, with the learning rate in a small panel.

    A detector's rows carry ``val_map`` and ``val_map50`` instead of accuracy: the right panel
    then shows those (mAP@[.5:.95] and mAP50 on validation, in %).
    """
    epochs = column(metrics, "epoch")
    detection = not np.isnan(column(metrics, "val_map")).all()
    if np.isnan(epochs).all():
        epochs = np.arange(1, len(metrics) + 1, dtype=float)
    marker = "o" if len(metrics) <= 30 else None
    with _styled_figure(4.2) as fig:
        grid = fig.add_gridspec(2, 2, height_ratios=(3, 1.1))
        loss_ax, acc_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
        lr_ax = fig.add_subplot(grid[1, :], sharex=loss_ax)
        right = ((("val_map50", "val mAP50", TRAIN_COLOR), ("val_map", "val mAP@[.5:.95]", VAL_COLOR))
                 if detection else (("train_acc", "train", TRAIN_COLOR), ("val_acc", "val", VAL_COLOR)))
        panels = ((loss_ax, 1.0, "loss", (("train_loss", "train", TRAIN_COLOR), ("val_loss", "val", VAL_COLOR))),
                  (acc_ax, 100.0, "mAP (%)" if detection else "accuracy (%)", right))
        for ax, scale, label, series in panels:
            for key, name, color in series:
                values = column(metrics, key) * scale
                if not np.isnan(values).all():
                    ax.plot(epochs, values, color=color, marker=marker, markersize=3,
                            linewidth=1.6, label=name)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            _mark_best(ax, best_epoch)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
        loss_ax.set_title("Loss")
        acc_ax.set_title("Validation mAP" if detection else "Accuracy")
        _lr_panel(lr_ax, epochs, column(metrics, "lr"))
        return to_png(fig)


def _mark_best(ax: Any, best_epoch: int | None) -> None:
    if as_float(best_epoch) is not None:
        ax.axvline(best_epoch, color="#999999", linestyle=":", linewidth=1.2)
        ax.annotate("best", xy=(best_epoch, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -10), textcoords="offset points", fontsize=7, color="#777777")


def _lr_panel(ax: Any, epochs: np.ndarray, lr: np.ndarray) -> None:
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    finite = lr[np.isfinite(lr)]
    if finite.size == 0:
        ax.text(0.5, 0.5, "no learning rate recorded", transform=ax.transAxes,
                ha="center", va="center", color="#999999")
        return
    ax.step(epochs, lr, where="mid", color=LR_COLOR, linewidth=1.4)
    positive = finite[finite > 0]
    if positive.size == finite.size and positive.max() / positive.min() > 20:
        ax.set_yscale("log")  # schedules spanning decades (warm-up, cosine to ~0)
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def grad_norms(history: dict[str, Any], events: Sequence[dict[str, Any]]) -> bytes:
    """Per-layer gradient norm vs step on a log axis, events as vertical lines."""
    steps = np.asarray([as_float(s) for s in history.get("step", [])], dtype=float)
    layers = {name: _positive(values, len(steps))
              for name, values in (history.get("layers") or {}).items()}
    with _styled_figure(3.6) as fig:
        ax = fig.add_subplot()
        colors = _layer_colors(len(layers))
        for i, (name, values) in enumerate(layers.items()):
            # many layers: name only the first and last; colour runs first→last
            label = name if len(layers) <= 12 else _end_label(name, i, len(layers))
            ax.plot(steps, values, color=colors[i], linewidth=1.1, alpha=0.9, label=label)
        if history.get("total") is not None:
            ax.plot(steps, _positive(history["total"], len(steps)), color="black",
                    linewidth=1.8, label="total")
        _event_lines(ax, events)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("gradient L2 norm (log)")
        ax.set_title("Gradient norm per layer")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
        return to_png(fig)


def _end_label(name: str, index: int, count: int) -> str | None:
    return f"{name} (first)" if index == 0 else f"{name} (last)" if index == count - 1 else None


def _positive(values: Sequence[Any], length: int) -> np.ndarray:
    """Values as floats, NaN where missing or not positive (a log axis cannot show them)."""
    array = np.full(length, math.nan)
    for i, value in enumerate(list(values)[:length]):
        number = as_float(value)
        if number is not None and number > 0:
            array[i] = number
    return array


def _layer_colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(count - 1, 1)) for i in range(count)]  # first→last layer


def _event_lines(ax: Any, events: Sequence[dict[str, Any]]) -> None:
    kinds: dict[str, str] = {}
    for event in events:
        step = as_float(event.get("step"))
        if step is None:
            continue
        kind = str(event.get("kind") or "event")
        first = kind not in kinds
        color = kinds.setdefault(kind, EVENT_COLORS[len(kinds) % len(EVENT_COLORS)])
        ax.axvline(step, color=color, linestyle="--", linewidth=1.0,
                   label=f"event: {kind}" if first else None)


def confusion_matrix(confusion: Sequence[Sequence[Any]], class_names: Sequence[str]) -> bytes:
    """Row-normalised confusion heatmap with counts; rows are the true class."""
    counts = np.nan_to_num(np.asarray([floats(row) for row in confusion], dtype=float))
    n = counts.shape[0]
    if counts.ndim != 2 or counts.shape != (n, n):
        raise ValueError(f"confusion matrix should be square, got shape {counts.shape}")
    names = _short_names(class_names, n)
    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    side = min(WIDTH_IN, 3.8 + 0.3 * n)
    with _styled_figure(side * 0.9, side) as fig:
        ax = fig.add_subplot()
        image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.grid(False)
        ticks = np.arange(n)
        tick_size = 8 if n <= 12 else 7 if n <= 24 else 6.5
        tilted = n > 12 or max(len(name) for name in names) > (3 if n > 4 else 10)
        ax.set_xticks(ticks, names, rotation=45 if tilted else 0,
                      ha="right" if tilted else "center", rotation_mode="anchor",
                      fontsize=tick_size)
        ax.set_yticks(ticks, names, fontsize=tick_size)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if n <= 20:  # beyond that the digits no longer fit the cells
            _annotate_counts(ax, counts, fraction, size=9 if n <= 8 else 7 if n <= 14 else 5.5)
        bar = fig.colorbar(image, ax=ax, shrink=0.8)
        bar.set_label("fraction of the true class")
        ax.set_title("Confusion matrix")
        return to_png(fig)


def _annotate_counts(ax: Any, counts: np.ndarray, fraction: np.ndarray, size: float) -> None:
    for (row, col), count in np.ndenumerate(counts):
        color = "white" if fraction[row, col] > 0.55 else "#bbbbbb" if count == 0 else "#222222"
        ax.text(col, row, f"{count:.0f}", ha="center", va="center", fontsize=size, color=color)


def _short_names(class_names: Sequence[str], count: int, width: int = 16) -> list[str]:
    """Names cut in the middle, so ``scratched_surface_12`` keeps its distinguishing end."""
    names = [str(name) for name in list(class_names)[:count]]
    names += [str(i) for i in range(len(names), count)]
    half = (width - 1) // 2
    return [name if len(name) <= width else f"{name[:half]}…{name[-half:]}" for name in names]


def display_width_px(png: bytes) -> int:
    """The width to show ``png`` at so that 1 in of figure is 100 px on screen."""
    width = int.from_bytes(png[16:20], "big")  # IHDR: the first chunk of every PNG
    return round(width * 100 / DPI)


def reliability_diagram(reliability: dict[str, Any], ece: Any) -> bytes:
    """Accuracy vs confidence per bin against the diagonal, with bin counts beneath."""
    keys = ("bin_lower", "bin_upper", "accuracy", "confidence", "count")
    lower, upper, accuracy, confidence, count = (floats(reliability.get(k) or []) for k in keys)
    if len({len(lower), len(upper), len(accuracy), len(confidence), len(count)}) != 1:
        raise ValueError(f"reliability lists {', '.join(keys)} differ in length")
    count = np.nan_to_num(count)
    width, shown = (upper - lower) * 100, (count > 0) & np.isfinite(accuracy)
    ece_value = as_float(ece)
    title = "Reliability" + (f" (ECE = {100 * ece_value:.1f}%)" if ece_value is not None else "")
    with _styled_figure(4.6, 4.6) as fig:
        grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
        ax, count_ax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
        ax.bar(lower[shown] * 100, accuracy[shown] * 100, width=width[shown], align="edge",
               color=TRAIN_COLOR, edgecolor="white", label="accuracy")
        ax.bar(lower[shown] * 100, (confidence - accuracy)[shown] * 100, width=width[shown],
               bottom=accuracy[shown] * 100, align="edge", color=VAL_COLOR, alpha=0.35,
               edgecolor=VAL_COLOR, hatch="//", label="gap to confidence")
        ax.plot([0, 100], [0, 100], color="#777777", linestyle="--", linewidth=1,
                label="perfect calibration")
        ax.set(xlim=(0, 100), ylim=(0, 100), ylabel="accuracy (%)", title=title)
        ax.tick_params(labelbottom=False)
        ax.legend(loc="upper left")
        count_ax.bar(lower * 100, count, width=width, align="edge", color="#9aa5b1",
                     edgecolor="white")
        count_ax.set(xlim=(0, 100), xlabel="confidence (%)", ylabel="images")
        return to_png(fig)


def thumbnail(png: bytes, target_px: int = 96, max_px: int = 128) -> bytes:
    """An image re-encoded as PNG, enlarged by an integer factor with nearest-neighbour
    so tiny (8×8) images stay crisp, or shrunk to ``max_px`` when large."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as source:
        image = source.convert("RGB") if source.mode not in ("L", "RGB") else source.copy()
    longest = max(image.size)
    if longest < target_px:
        factor = math.ceil(target_px / longest)
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    elif longest > max_px:
        image.thumbnail((max_px, max_px), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
