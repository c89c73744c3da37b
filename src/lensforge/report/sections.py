"""Built-in report sections about the run itself: summary, training, bundle, config.

The evaluation section lives in :mod:`lensforge.report.evaluation`.
"""

from __future__ import annotations

from typing import Any

from lensforge.report import plots
from lensforge.report.blocks import (
    Block,
    Callout,
    Code,
    Figure,
    Section,
    Stat,
    Stats,
    Table,
    Text,
    Tone,
)
from lensforge.report.formatting import (
    MISSING,
    as_float,
    fmt_bytes,
    fmt_count,
    fmt_int,
    fmt_number,
    fmt_percent,
    fmt_sci,
    fmt_seconds,
    fmt_text,
)
from lensforge.report.registry import register_section
from lensforge.report.runfiles import RunFiles

# Tone of a fit diagnosis (kinds from lensforge.train.diagnosis); unknown kinds warn.
_FIT_TONES: dict[str, Tone] = {"healthy": "ok", "still_improving": "info"}
_MAX_EVENT_ROWS = 50


@register_section("summary", order=10)
def summary_section(run: RunFiles) -> Section | None:
    """Key numbers of the run and its diagnoses, first thing in the report."""
    info, evals, diagnosis = run.run or {}, run.evals, run.diagnosis or {}
    if not (info or evals or diagnosis or run.health or run.manifest):
        return None
    split, scores = next(iter(evals.items()), ("test", {}))
    label = split.capitalize()
    timings = info.get("timings_s") or {}
    manifest = run.manifest
    bundle_size = _bundle_bytes(manifest) if manifest else None
    if scores.get("task") == "detection":
        from lensforge.report.detection import detection_stats

        headline = detection_stats(scores, label)[:3]
    else:
        headline = [
            Stat(f"{label} accuracy", fmt_percent(scores.get("accuracy")),
                 note=f"{fmt_int(scores.get('num_samples'))} images" if scores else ""),
            Stat(f"{label} macro-F1", fmt_percent(scores.get("macro_f1"))),
            Stat(f"{label} ECE", fmt_percent(scores.get("ece")), note=ece_note(scores)),
        ]
    stats = Stats([
        *headline,
        Stat("Parameters", fmt_count(info.get("params"))),
        Stat("Training time", fmt_seconds(timings.get("train")),
             note=f"best epoch {fmt_int(info.get('best_epoch'))}"
             if info.get("best_epoch") is not None else ""),
        Stat("Bundle", "bundle/" if manifest else MISSING,
             note=fmt_bytes(bundle_size) if manifest else "not exported"),
    ])
    blocks: list[Block] = [*_chance_banner(split, scores), stats, *_diagnosis_callouts(run)]
    if timings:
        parts = [f"{stage} {fmt_seconds(seconds)}" for stage, seconds in timings.items()]
        blocks.append(Text("Time spent: " + " · ".join(parts) + ".", muted=True))
    return Section("Summary", blocks)


def ece_note(scores: dict[str, Any]) -> str:
    """Under an ECE figure: whether it is the shipped (calibrated) one, with the uncalibrated value beside it."""
    before = scores.get("ece_uncalibrated")
    if before is None:
        return "calibration error"
    return f"as shipped ({fmt_percent(before)} uncalibrated)"


def _chance_banner(split: str, scores: dict[str, Any]) -> list[Block]:
    """A red banner when the model scores at chance level on this split: nothing else in the report matters."""
    if not scores.get("at_chance"):
        return []
    return [Callout(
        f"{split.capitalize()} accuracy {fmt_percent(scores.get('accuracy'))} is no better than always answering "
        f"the most frequent class ({fmt_percent(scores.get('chance_accuracy'))}): this model learned nothing usable. "
        "Compression and selection refuse it as a parent, and autopilot exits with code 4.",
        title="At chance level", tone="bad",
        suggestions=["Train longer (more epochs) or with a higher learning rate; see the fit diagnosis below.",
                     "Check that the labels match the images (a shuffled label column trains to chance).",
                     "Try a smaller model first: large models from scratch need many more steps."])]


def _diagnosis_callouts(run: RunFiles) -> list[Block]:
    """Fit diagnoses (with suggestions) and gradient-health sentences."""
    diagnosis = run.diagnosis or {}
    callouts: list[Block] = []
    for item in diagnosis.get("fit") or []:
        if not isinstance(item, dict):
            continue
        kind = str(item.get("kind") or "")
        callouts.append(Callout(
            fmt_text(item.get("message")),
            title=kind.replace("_", " ").capitalize() or "Fit",
            suggestions=[str(s) for s in item.get("suggestions") or []],
            tone=_FIT_TONES.get(kind, "warn"),
        ))
    health = diagnosis.get("health")
    if health is None:
        health = (run.health or {}).get("diagnosis")
    if health:
        callouts.append(Callout(" ".join(str(s) for s in health), title="Gradient health",
                                tone="info"))
    return callouts


def _bundle_bytes(manifest: dict[str, Any]) -> float | None:
    sizes = [as_float(entry.get("bytes")) for entry in (manifest.get("files") or {}).values()
             if isinstance(entry, dict)]
    known = [size for size in sizes if size is not None]
    return sum(known) if known else None


@register_section("learning-curves", order=20)
def learning_curves_section(run: RunFiles) -> Section | None:
    """Loss, accuracy and learning rate per epoch, with the per-epoch table folded."""
    metrics = run.metrics
    if not metrics:
        return None
    best_epoch = (run.run or {}).get("best_epoch")
    figure = Figure(plots.learning_curves(metrics, best_epoch),
                    alt="Training and validation loss and accuracy per epoch, learning rate",
                    caption="Train and validation curves; the dotted line marks the best epoch.")
    columns = ("epoch", "train loss", "val loss", "train acc", "val acc", "lr", "images/s",
               "epoch time")
    rows = [[fmt_int(row.get("epoch")), fmt_number(row.get("train_loss")),
             fmt_number(row.get("val_loss")), fmt_percent(row.get("train_acc")),
             fmt_percent(row.get("val_acc")), fmt_sci(row.get("lr")),
             fmt_int(row.get("images_per_s")), fmt_seconds(row.get("epoch_time_s"))]
            for row in metrics]
    best = [i for i, row in enumerate(metrics) if best_epoch is not None
            and row.get("epoch") == best_epoch]
    table = Table(columns, rows, caption=f"Metrics per epoch ({len(rows)} epochs)",
                  numeric=range(len(columns)), highlight=best, collapsed=True)
    return Section("Learning curves", [figure, table])


@register_section("gradient-health", order=30)
def gradient_health_section(run: RunFiles) -> Section | None:
    """Per-layer gradient norms over training, and the events the monitor raised."""
    health = run.health or {}
    history = health.get("history") or {}
    events = [e for e in health.get("events") or [] if isinstance(e, dict)]
    if not (history.get("step") or events):
        return None
    blocks: list[Block] = []
    if history.get("step"):
        blocks.append(Figure(plots.grad_norms(history, events),
                             alt="Gradient L2 norm per layer against optimizer step, log scale",
                             caption="Dashed vertical lines mark health events."))
    if not events:
        blocks.append(Text("No gradient events were raised during training.", muted=True))
        return Section("Gradient health", blocks)
    columns = ("step", "epoch", "kind", "layer", "value", "action", "message")
    rows = [[fmt_int(e.get("step")), fmt_int(e.get("epoch")), fmt_text(e.get("kind")),
             fmt_text(e.get("layer")), fmt_sci(e.get("value")), fmt_text(e.get("action")),
             fmt_text(e.get("message"))] for e in events[:_MAX_EVENT_ROWS]]
    more = len(events) - len(rows)
    caption = f"Events ({len(events)})" + (f", first {len(rows)} shown" if more > 0 else "")
    blocks.append(Table(columns, rows, caption=caption, numeric=(0, 1, 4), mono=(3,)))
    return Section("Gradient health", blocks)


@register_section("bundle", order=50)
def bundle_section(run: RunFiles) -> Section | None:
    """Where the exported bundle is, what it holds, and whether it matches PyTorch."""
    manifest = run.manifest
    if manifest is None:
        return None
    preprocess = manifest.get("preprocess") or {}
    stats = Stats([
        Stat("Model", fmt_text(manifest.get("model")), note=fmt_text(manifest.get("task"))),
        Stat("Classes", fmt_int(len(manifest.get("class_names") or []) or None)),
        Stat("Input", _input_size(preprocess.get("input_size"))),
        Stat("Size", fmt_bytes(_bundle_bytes(manifest))),
        _parity_stat(manifest.get("parity") or {}),
    ])
    files = manifest.get("files") or {}
    rows = [[name, fmt_bytes(entry.get("bytes")), _short_hash(entry.get("sha256"))]
            for name, entry in files.items() if isinstance(entry, dict)]
    blocks: list[Block] = [Text(f"Path: {run.path('bundle')}"), stats]
    if rows:
        blocks.append(Table(("file", "size", "sha256"), rows, caption="Files",
                            numeric=(1,), mono=(0, 2)))
    return Section("Bundle", blocks)


def _parity_stat(parity: dict[str, Any]) -> Stat:
    """Largest ONNX-vs-PyTorch logit difference against the tolerance it was checked at."""
    if parity.get("same_detections") is not None:  # a detector: the same boxes after decoding
        same = as_float(parity.get("same_detections")) or 0.0
        return Stat("Export parity", f"{fmt_percent(same, 0)} {'✓' if same == 1.0 else '✗'}",
                    note=f"images with the same decoded detections as PyTorch ({fmt_int(parity.get('n_images'))} "
                         f"checked); max |Δ logits| {fmt_sci(parity.get('max_abs_diff_cls_logits'))}",
                    tone="ok" if same == 1.0 else "bad")
    diff = as_float(parity.get("max_abs_diff_logits", parity.get("max_abs_diff")))
    atol = as_float(parity.get("atol"))
    if diff is None:
        return Stat("Export parity", MISSING, note="not checked")
    passed = atol is None or diff <= atol
    notes = ["max |Δ logits| vs PyTorch"]
    if atol is not None:
        notes.append(f"atol {fmt_sci(atol)}")
    if as_float(parity.get("top1_agreement")) is not None:
        notes.append(f"top-1 agreement {fmt_percent(parity['top1_agreement'])}")
    return Stat("Export parity", f"{fmt_sci(diff)} {'✓' if passed else '✗'}",
                note=", ".join(notes), tone="ok" if passed else "bad")


def _short_hash(digest: Any) -> str:
    return f"{digest[:16]}…" if isinstance(digest, str) and len(digest) > 16 else fmt_text(digest)


def _input_size(size: Any) -> str:
    if isinstance(size, (list, tuple)) and size:
        return " × ".join(fmt_int(v) for v in size) + " px"
    return MISSING


@register_section("configuration", order=90)
def configuration_section(run: RunFiles) -> Section | None:
    """Preprocessing, class names and the resolved training config (folded)."""
    info, config = run.run or {}, run.config_text
    preprocess = info.get("preprocess") or {}
    class_names = info.get("class_names") or []
    if not (config or preprocess or class_names):
        return None
    blocks: list[Block] = []
    if preprocess:
        blocks.append(Stats([
            Stat("Input size", _input_size(preprocess.get("input_size"))),
            Stat("Channels", fmt_text(preprocess.get("channels"))),
            Stat("Mean", fmt_text(preprocess.get("mean"))),
            Stat("Std", fmt_text(preprocess.get("std"))),
            Stat("Interpolation", fmt_text(preprocess.get("interpolation"))),
        ]))
    if class_names:
        names = ", ".join(str(name) for name in class_names)
        blocks.append(Text(f"Classes ({len(class_names)}): {names}"))
    if config:
        blocks.append(Code(config, summary="Resolved training config (config.yaml)"))
    return Section("Configuration", blocks)
