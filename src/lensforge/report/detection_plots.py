"""Detection figures as PNG bytes: PR curves, the confusion matrix with background, an error gallery.

Drawn the way :mod:`lensforge.report.plots` draws (its style, sizes and PNG writer); they take
plain arrays, as :mod:`lensforge.evaluate.detection` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lensforge.report.plots import WIDTH_IN, _short_names, _styled_figure, confusion_matrix, to_png

BACKGROUND = "background"
# How the gallery draws each kind of box: colour, line style, legend label
TRUE_POSITIVE_STYLE = ("#2ca02c", "solid", "correct")
FALSE_POSITIVE_STYLE = ("#d62728", "dashed", "false positive")
MISSED_STYLE = ("#ff7f0e", "dotted", "missed")


def precision_recall_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                            average_precision: Mapping[str, float | None] | None = None, iou: float = 0.5) -> bytes:
    """Precision vs recall per class, as the interpolated envelope that AP integrates.

    Args:
        curves: {class name: (recall, precision)} after each detection in descending score
            (:func:`lensforge.evaluate.detection.pr_curves`).
        average_precision: optional {class name: AP}, shown in the legend.
        iou: the IoU the curves were matched at, for the title.
    """
    with _styled_figure(4.2, 5.6) as fig:
        ax = fig.add_subplot()
        colors = _class_colors(len(curves))
        for color, (name, (recall, precision)) in zip(colors, curves.items()):
            recall, precision = np.asarray(recall, dtype=float), np.asarray(precision, dtype=float)
            if not len(recall):
                continue
            envelope = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at this recall or more
            ap = (average_precision or {}).get(name)
            label = _short_names([name], 1)[0] + (f" (AP {ap:.2f})" if ap is not None else "")
            ax.step(np.r_[0.0, recall], np.r_[envelope[0], envelope], where="pre", color=color,
                    linewidth=1.6 if len(curves) <= 10 else 1.0, label=label if len(curves) <= 20 else None)
        if not curves:
            ax.text(0.5, 0.5, "no ground-truth objects", transform=ax.transAxes, ha="center", va="center",
                    color="#999999")
        ax.set(xlim=(0, 1.01), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
               title=f"Precision–recall per class (IoU {iou:g})")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left")
        return to_png(fig)


def _class_colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def detection_confusion_matrix(matrix: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
    """The (C + 1, C + 1) detection confusion matrix; its last row and column are background.

    Row "background" holds false positives (a detection where no object is), column
    "background" missed objects.
    """
    matrix = np.asarray(matrix)
    if matrix.shape != (len(class_names) + 1, len(class_names) + 1):
        raise ValueError(f"a detection confusion matrix for {len(class_names)} classes is "
                         f"{len(class_names) + 1} x {len(class_names) + 1} (background last), got {matrix.shape}")
    return confusion_matrix(matrix.tolist(), [*map(str, class_names), BACKGROUND])


def error_gallery(images: Sequence[np.ndarray], tp_boxes: Sequence[np.ndarray], fp_boxes: Sequence[np.ndarray],
                  missed_boxes: Sequence[np.ndarray], *, titles: Sequence[str] | None = None,
                  columns: int = 4) -> bytes:
    """Images with their boxes: correct green solid, false positives red dashed, missed orange dotted.

    Args:
        images: uint8 (C, H, W) arrays, C = 1 or 3, in the pixels the boxes are in.
        tp_boxes, fp_boxes, missed_boxes: per image, (K, 4) xyxy boxes (K may be 0).
        titles: per image, e.g. "#12: 3 errors".
        columns: images per row.
    """
    count = len(images)
    if not len(tp_boxes) == len(fp_boxes) == len(missed_boxes) == count:
        raise ValueError(f"{count} images but {len(tp_boxes)}, {len(fp_boxes)}, {len(missed_boxes)} box lists")
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    cell = WIDTH_IN / columns
    aspect = max((image.shape[-2] / max(1, image.shape[-1]) for image in images), default=0.5)
    with _styled_figure(min(3 * WIDTH_IN, rows * cell * aspect + 0.6), WIDTH_IN) as fig:
        if not count:
            ax = fig.add_subplot()
            ax.axis("off")
            ax.text(0.5, 0.5, "no images with errors", ha="center", va="center", color="#999999")
            return to_png(fig)
        axes = fig.subplots(rows, columns, squeeze=False)
        for index, ax in enumerate(axes.flat):
            ax.axis("off")
            if index >= count:
                continue
            _show_image(ax, images[index])
            for boxes, style in ((tp_boxes[index], TRUE_POSITIVE_STYLE), (fp_boxes[index], FALSE_POSITIVE_STYLE),
                                 (missed_boxes[index], MISSED_STYLE)):
                _draw_boxes(ax, boxes, style)
            if titles is not None:
                ax.set_title(str(titles[index]), fontsize=8)
        fig.legend(handles=_legend_handles(), loc="outside upper center", ncols=3)
        return to_png(fig)


def _show_image(ax: Any, image: np.ndarray) -> None:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"gallery images are uint8 (C, H, W) with C = 1 or 3, got shape {image.shape}")
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(np.transpose(image, (1, 2, 0)), interpolation="nearest")


def _draw_boxes(ax: Any, boxes: np.ndarray, style: tuple[str, str, str]) -> None:
    from matplotlib.patches import Rectangle

    color, linestyle, _ = style
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=float).reshape(-1, 4):
        # pixel centres sit on integer coordinates in imshow, so pixel edges are at -0.5
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                               linestyle=linestyle, linewidth=1.5))


def _legend_handles() -> list[Any]:
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=color, linestyle=linestyle, linewidth=1.5, label=label)
            for color, linestyle, label in (TRUE_POSITIVE_STYLE, FALSE_POSITIVE_STYLE, MISSED_STYLE)]
