"""Built-in evaluation section: one group per split in ``eval/<split>.json``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lensforge.errors import ArtifactError
from lensforge.report import plots
from lensforge.report.blocks import (
    Block,
    Figure,
    Gallery,
    Group,
    Section,
    Stat,
    Stats,
    Table,
    Text,
    Thumb,
)
from lensforge.report.detection import detection_split_blocks
from lensforge.report.formatting import as_float, fmt_int, fmt_percent, fmt_text
from lensforge.report.registry import register_section
from lensforge.report.runfiles import RunFiles
from lensforge.report.sections import ece_note

MAX_MISTAKES = 24  # thumbnails shown per split, most confident first
MAX_CONFUSED_PAIRS = 10
_EVALUATED = {"run": "the trained PyTorch model", "bundle": "the exported bundle"}


@register_section("evaluation", order=40)
def evaluation_section(run: RunFiles) -> Section | None:
    """Metrics, confusion matrix, per-class scores, calibration and mistakes per split."""
    evals = run.evals
    if not evals:
        return None
    groups: list[Block] = [Group(_split_title(split, scores), _split_blocks(run, scores))
                           for split, scores in evals.items()]
    return Section("Evaluation", groups)


def _split_title(split: str, scores: dict[str, Any]) -> str:
    evaluated = _EVALUATED.get(str(scores.get("evaluated")), "")
    suffix = f", evaluated on {evaluated}" if evaluated else ""
    images = scores.get("num_samples", scores.get("images"))
    return f"{split.capitalize()} split — {fmt_int(images)} images{suffix}"


def _split_blocks(run: RunFiles, scores: dict[str, Any]) -> list[Block]:
    return SPLIT_BLOCKS.get(str(scores.get("task", "classification")), _classification_blocks)(run, scores)


def _classification_blocks(run: RunFiles, scores: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [Stats([
        Stat("Accuracy", fmt_percent(scores.get("accuracy"))),
        Stat("Macro-F1", fmt_percent(scores.get("macro_f1"))),
        Stat("ECE", fmt_percent(scores.get("ece")), note=ece_note(scores)),
        Stat("Images", fmt_int(scores.get("num_samples"))),
    ])]
    names = _class_names(run, scores)
    confusion = scores.get("confusion")
    if confusion:
        png = plots.confusion_matrix(confusion, names)
        blocks.append(Figure(png, alt="Confusion matrix heatmap, rows true class, columns predicted",
                             caption="Rows are the true class; colour is the share of that "
                                     "row, numbers are image counts.",
                             width_px=plots.display_width_px(png)))
        blocks.extend(_confused_pairs(confusion, names))
    if scores.get("per_class"):
        blocks.append(_per_class_table(scores))
    if scores.get("reliability"):
        png = plots.reliability_diagram(scores["reliability"], scores.get("ece"))
        blocks.append(Figure(png, alt="Reliability diagram: accuracy against confidence per bin",
                             caption="Bars below the diagonal mean over-confidence.",
                             width_px=plots.display_width_px(png)))
    if scores.get("mistakes"):
        blocks.append(_mistakes_gallery(run, scores["mistakes"]))
    return blocks


SPLIT_BLOCKS = {"classification": _classification_blocks, "detection": detection_split_blocks}  # by task


def _class_names(run: RunFiles, scores: dict[str, Any]) -> list[str]:
    names = (run.run or {}).get("class_names") or (run.manifest or {}).get("class_names")
    if not names:
        names = [row.get("name") for row in scores.get("per_class") or []]
    return [str(name) for name in names]


def _confused_pairs(confusion: Sequence[Sequence[Any]], names: Sequence[str]) -> list[Block]:
    """The largest off-diagonal cells: which class is mistaken for which, how often."""
    cells = []
    for true_index, row in enumerate(confusion):
        total = sum(as_float(v) or 0.0 for v in row)
        for pred_index, value in enumerate(row):
            count = as_float(value) or 0.0
            if pred_index != true_index and count > 0:
                cells.append((count, true_index, pred_index, count / total))
    if not cells:
        return []
    cells.sort(key=lambda cell: -cell[0])
    rows = [[_name(names, t), _name(names, p), fmt_int(count), fmt_percent(share)]
            for count, t, p, share in cells[:MAX_CONFUSED_PAIRS]]
    return [Table(("true class", "predicted as", "images", "share of true class"), rows,
                  caption="Most frequent confusions", numeric=(2, 3))]


def _name(names: Sequence[str], index: int) -> str:
    return names[index] if index < len(names) else str(index)


def _per_class_table(scores: dict[str, Any]) -> Table:
    worst = {str(row.get("name")) for row in scores.get("worst_classes") or []}
    rows, highlight = [], []
    for i, row in enumerate(scores["per_class"]):
        name = fmt_text(row.get("name"))
        if name in worst:
            highlight.append(i)
        rows.append([name, fmt_percent(row.get("precision")), fmt_percent(row.get("recall")),
                     fmt_percent(row.get("f1")), fmt_int(row.get("support"))])
    caption = "Per-class scores" + (" (highlighted: the worst classes)" if highlight else "")
    return Table(("class", "precision", "recall", "F1", "support"), rows, caption=caption,
                 numeric=(1, 2, 3, 4), highlight=highlight)


def _mistakes_gallery(run: RunFiles, mistakes: Sequence[dict[str, Any]]) -> Block:
    """The most confident mistakes as enlarged thumbnails, ``true → pred (conf)``."""
    ranked = sorted((m for m in mistakes if isinstance(m, dict)),
                    key=lambda m: -(as_float(m.get("confidence")) or 0.0))
    thumbs = [Thumb(_thumbnail(run, m.get("image")),
                    caption=f"{fmt_text(m.get('true'))} → {fmt_text(m.get('pred'))} "
                            f"({fmt_percent(m.get('confidence'), 0)})",
                    title=fmt_text(m.get("origin")))
              for m in ranked[:MAX_MISTAKES]]
    if not thumbs:
        return Text("No mistakes recorded.", muted=True)
    shown = f"{len(thumbs)} of {len(ranked)}" if len(ranked) > len(thumbs) else f"{len(thumbs)}"
    return Gallery(thumbs, caption=f"Most confident mistakes ({shown}): true → predicted "
                                   "(confidence)")


def _thumbnail(run: RunFiles, relpath: Any) -> bytes | None:
    """The mistake's image as an enlarged PNG, or None if missing or unreadable."""
    if not isinstance(relpath, str) or not relpath:
        return None
    try:
        png = run.bytes(relpath)
        return plots.thumbnail(png) if png is not None else None
    except (ArtifactError, OSError, ValueError):  # outside the run folder, or not an image
        return None
