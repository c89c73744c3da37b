"""Report blocks of a detector's evaluation (``eval/<split>.json`` with ``"task": "detection"``).

COCO metrics, precision/recall/F1 at the shipped score threshold, per-class AP, and the
plots :mod:`lensforge.evaluate.detection_runner` wrote beside the metrics: PR curves, the
confusion matrix with its background row and column, and the worst images with their
boxes drawn (true positives, false positives and missed objects in distinct styles).
"""

from __future__ import annotations

from typing import Any

from lensforge.errors import ArtifactError
from lensforge.report import plots
from lensforge.report.blocks import Block, Figure, Stat, Stats, Table, Text
from lensforge.report.formatting import fmt_int, fmt_number, fmt_percent, fmt_text
from lensforge.report.runfiles import RunFiles

_FIGURES = (
    ("pr_curves", "Precision-recall curves per class at IoU 0.5",
     "Precision against recall per class, detections taken in descending score (IoU 0.5)."),
    ("confusion_matrix", "Detection confusion matrix with a background row and column",
     "Rows are the true class, columns the predicted one; the background row counts detections of nothing, "
     "the background column missed objects (at the shipped score threshold, IoU 0.5)."),
    ("worst_images", "The images with the most errors, boxes drawn",
     "The images with the most errors: green solid boxes are right, red dashed wrong (no such object there), "
     "orange dotted missed objects."),
)


def detection_stats(scores: dict[str, Any], label: str = "") -> list[Stat]:
    """The headline numbers: mAP@[.5:.95], mAP50, and P/R/F1 at the shipped threshold."""
    prefix = f"{label} " if label else ""
    threshold = scores.get("score_threshold")
    return [
        Stat(f"{prefix}mAP@[.5:.95]", fmt_number(scores.get("map")),
             note=f"{fmt_int(scores.get('images'))} images, {fmt_int(scores.get('objects'))} objects"),
        Stat(f"{prefix}mAP50", fmt_number(scores.get("map50"))),
        Stat(f"{prefix}precision / recall", f"{fmt_percent(scores.get('precision'))} / "
                                            f"{fmt_percent(scores.get('recall'))}",
             note=f"at score ≥ {fmt_number(threshold)} (best F1 on val)" if threshold is not None else ""),
        Stat(f"{prefix}F1", fmt_percent(scores.get("f1"))),
    ]


def detection_split_blocks(run: RunFiles, scores: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [Stats(detection_stats(scores)), _size_table(scores)]
    per_class = scores.get("per_class_ap") or {}
    if per_class:
        rows = [[fmt_text(name), fmt_number(ap)] for name, ap in per_class.items()]
        blocks.append(Table(("class", "AP@[.5:.95]"), rows, caption="Per-class average precision "
                            "(— : no such object in this split)", numeric=(1,)))
    for key, alt, caption in _FIGURES:
        png = _plot(run, (scores.get("plots") or {}).get(key))
        if png is not None:
            blocks.append(Figure(png, alt=alt, caption=caption, width_px=plots.display_width_px(png)))
    if not scores.get("plots"):
        blocks.append(Text("No plots recorded for this split.", muted=True))
    return blocks


def _size_table(scores: dict[str, Any]) -> Table:
    rows = [["mAP@[.5:.95]", fmt_number(scores.get("map"))], ["mAP50", fmt_number(scores.get("map50"))],
            ["mAP75", fmt_number(scores.get("map75"))],
            ["small objects (< 32² px)", fmt_number(scores.get("map_small"))],
            ["medium objects", fmt_number(scores.get("map_medium"))],
            ["large objects (> 96² px)", fmt_number(scores.get("map_large"))],
            ["AR@100", fmt_number(scores.get("mar100"))]]
    return Table(("COCO metric", "value"), rows, caption="COCO metrics in original-image pixels "
                 "(— : no objects of that size)", numeric=(1,))


def _plot(run: RunFiles, relpath: Any) -> bytes | None:
    if not isinstance(relpath, str) or not relpath:
        return None
    try:
        return run.bytes(relpath)
    except (ArtifactError, OSError, ValueError):
        return None
