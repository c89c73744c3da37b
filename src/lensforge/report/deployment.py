"""The Deployment section: compressed variants, the pick under a budget, hardware utilisation.

Three optional files of a run folder, each written by another stage, add one group each:
``variants/variants.json`` (:func:`lensforge.compress.variants.compress`), ``selection.json``
(:func:`lensforge.select.select`, copied into every candidate's run folder) and ``bench.json``
(``lensforge bench``, a :class:`lensforge.deploy.bench.BenchReport`). The section is left
out when none exists. The files are read as plain JSON: torch is never imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from lensforge.errors import ArtifactError
from lensforge.report import plots
from lensforge.report.blocks import Block, Callout, Figure, Group, Section, Stat, Stats, Table, Text
from lensforge.report.formatting import MISSING, as_float, fmt_count, fmt_int, fmt_percent, fmt_text
from lensforge.report.registry import register_section
from lensforge.report.runfiles import RunFiles
from lensforge.tradeoffs import Budget, Option, explain_failure, pareto_mask

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure as MplFigure

VARIANTS_FILE = "variants/variants.json"
SELECTION_FILE = "selection.json"
BENCH_FILE = "bench.json"
MAX_PLOT_LABELS = 12  # beyond this many points only the front and the pick are named (the table has all)
FRONT_COLOR, OTHER_COLOR, LIMIT_COLOR, PICK_COLOR = "#3b6ea8", "#aab4bf", "#c62828", "#2e7d32"
SERIES_COLORS = ("#3b6ea8", "#e07b39", "#5a9e6f", "#8c6bb1", "#c4a000", "#6b6b6b")


@register_section("deployment", order=45)
def deployment_section(run: RunFiles) -> Section | None:
    """Variants table, budgeted pick with its Pareto plot, and the benchmark's use of the CPU."""
    variants, selection, bench = (_json_object(run, name)
                                  for name in (VARIANTS_FILE, SELECTION_FILE, BENCH_FILE))
    groups: list[Block] = []
    if variants is not None:
        # the selection's plot already shows this run's variants among all candidates
        groups.append(Group("Compressed variants", _variant_blocks(variants, plot=selection is None)))
    if selection is not None:
        groups.append(Group("Pick under the budget", _selection_blocks(selection)))
    if bench is not None:
        groups.append(Group("Hardware utilisation", _bench_blocks(run, bench)))
    return Section("Deployment", groups) if groups else None


def _json_object(run: RunFiles, relpath: str) -> dict[str, Any] | None:
    data = run.json(relpath)
    if data is not None and not isinstance(data, dict):
        raise ArtifactError(f"{run.path(relpath)} should hold a JSON object")
    return data


def _dicts(items: Any) -> list[dict[str, Any]]:
    return [item for item in items or [] if isinstance(item, dict)]


# ---------------------------------------------------------------------------- formatting


def fmt_ms(value: Any) -> str:
    """A latency in ms with three significant digits: ``0.0812``, ``1.23``, ``123``."""
    number = as_float(value)
    if number is None:
        return MISSING
    return f"{number:.0f}" if abs(number) >= 100 else f"{number:.3g}"


def fmt_mb(value: Any) -> str:
    number = as_float(value)
    return MISSING if number is None else f"{number:.2f}" if abs(number) < 10 else f"{number:.1f}"


def _fmt_speedup(value: Any) -> str:
    number = as_float(value)
    return MISSING if number is None else f"{number:.2f}×"


def _fmt_change_points(drop_points: Any) -> str:
    """Accuracy change vs the parent from the stored drop: ``-0.45`` points lost, ``+0.12`` gained."""
    drop = as_float(drop_points)
    return MISSING if drop is None else f"{-drop:+.2f}"


def _fmt_status(status: Any) -> str:
    return {"accepted": "✓ accepted", "rejected": "✗ rejected"}.get(str(status), fmt_text(status))


def _points(value: float) -> str:
    return f"{value:g} accuracy point" + ("" if value == 1 else "s")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# ---------------------------------------------------------------------------- variants


def _variant_blocks(data: dict[str, Any], *, plot: bool) -> list[Block]:
    variants = _dicts(data.get("variants"))
    blocks: list[Block] = [Text(_compress_config_line(data.get("config") or {}))]
    if not variants:
        return [*blocks, Text("variants.json lists no variants.", muted=True)]
    blocks += [_variant_stats(variants), _variants_table(variants), *_rejections(variants)]
    points = [_variant_point(v) for v in variants]
    front = pareto_mask([p.accuracy for p in points], [p.latency_ms for p in points],
                        [p.size_mb for p in points], [p.accepted for p in points])
    points = [replace(p, pareto=on) for p, on in zip(points, front)]
    if plot and sum(p.plottable for p in points) >= 2:
        blocks.append(Figure(tradeoff_plot(points, title="Variants of this run"),
                             alt="Accuracy against p50 latency of each variant, marker area by model size",
                             caption="Accuracy against latency at batch 1 (log scale); marker area is the "
                                     "model's size. Blue points form the Pareto front: no other variant is "
                                     "at least as accurate, as fast and as small. Hollow: rejected."))
    return blocks


def _compress_config_line(config: dict[str, Any]) -> str:
    """The compress options in words: what was made, and the guard every variant had to pass."""
    if not config:
        return "Compression options were not recorded."
    parts = []
    prune = as_float(config.get("prune"))
    if prune:
        steps = int(as_float(config.get("prune_steps")) or 1)
        text = f"pruned {prune:.0%} of the channels" + (f" in {steps} steps" if steps > 1 else "")
        if config.get("distill") or config.get("teacher"):
            text += f", distilled from {config.get('teacher') or 'the unpruned model'}"
        parts.append(text + f", fine-tuned {fmt_int(config.get('finetune_epochs'))} epochs")
    quantize = [str(kind) for kind in config.get("quantize") or []]
    if quantize:
        text = "quantized to " + " and ".join(quantize)
        if "int8" in quantize:
            text += (f" (int8: {fmt_text(config.get('calibration_method'))} calibration on "
                     f"{fmt_int(config.get('calibration_images'))} training images)")
        parts.append(text)
    made = "; ".join(parts) or "no pruning or quantization"
    max_drop = as_float(config.get("max_drop"))
    guard = f"at most {_points(max_drop)} lost" if max_drop is not None else "no accuracy limit"
    return (f"Compression: {made}. Guard: a variant is accepted with {guard} against its parent "
            "and only if it is faster than it.")


def _variant_stats(variants: list[dict[str, Any]]) -> Stats:
    baseline = next((v for v in variants if v.get("kind") == "baseline" or not v.get("parent")), None)
    made = [v for v in variants if v is not baseline]
    accepted = [v for v in made if v.get("status") == "accepted"]
    rejected = [v for v in made if v.get("status") == "rejected"]
    items = [
        Stat("Variants", fmt_int(len(made)), note="besides the baseline" if baseline else ""),
        Stat("Accepted", fmt_int(len(accepted)), note="passed their guard", tone="ok" if accepted else ""),
        Stat("Rejected", fmt_int(len(rejected)), note="kept on disk, not for shipping",
             tone="warn" if rejected else ""),
    ]
    base_ms = as_float(((baseline or {}).get("latency_ms") or {}).get("p50"))
    timed = [(as_float((v.get("latency_ms") or {}).get("p50")), v) for v in accepted]
    timed = [(ms, v) for ms, v in timed if ms]
    if base_ms and timed and baseline is not None:
        ms, fastest = min(timed, key=lambda pair: pair[0])
        change = _accuracy_change(fastest, baseline)
        items.append(Stat("Fastest accepted", f"{base_ms / ms:.2f}×",
                          note=f"{fmt_text(fastest.get('name'))} vs the baseline, {change} points",
                          tone="ok"))
    return Stats(items)


def _accuracy_change(variant: dict[str, Any], reference: dict[str, Any]) -> str:
    ours = as_float((variant.get("metrics") or {}).get("accuracy"))
    theirs = as_float((reference.get("metrics") or {}).get("accuracy"))
    return MISSING if ours is None or theirs is None else f"{100 * (ours - theirs):+.2f}"


def _variants_table(variants: list[dict[str, Any]]) -> Table:
    columns = ("variant", "kind", "parent", "accuracy", "Δ points", "p50 ms", "p90 ms", "p99 ms", "size MB",
               "speed-up", "status")
    rows, rejected = [], []
    for i, v in enumerate(variants):
        latency = v.get("latency_ms") or {}
        rows.append([fmt_text(v.get("name")), fmt_text(v.get("kind")), fmt_text(v.get("parent")),
                     fmt_percent((v.get("metrics") or {}).get("accuracy")), _fmt_change_points(v.get("drop_points")),
                     fmt_ms(latency.get("p50")), fmt_ms(latency.get("p90")), fmt_ms(latency.get("p99")),
                     fmt_mb(v.get("size_mb")), _fmt_speedup(v.get("speedup")), _fmt_status(v.get("status"))])
        if v.get("status") == "rejected":
            rejected.append(i)
    first = variants[0]
    images = fmt_int((first.get("metrics") or {}).get("num_samples"))
    batch = fmt_int((first.get("latency_ms") or {}).get("batch"))
    caption = (f"Each variant evaluated through its ONNX file on the test split ({images} images) and timed "
               f"side by side with the others (ONNX Runtime, batch {batch}); Δ points and speed-up are against "
               "the parent" + ("; highlighted: rejected by the guard, reasons below" if rejected else ""))
    return Table(columns, rows, caption=caption, numeric=range(3, 10), mono=(0, 2), highlight=rejected)


def _rejections(variants: list[dict[str, Any]]) -> list[Block]:
    """Why each rejected variant failed its guard (accepted ones' reasons repeat their row's numbers)."""
    rejected = [v for v in variants if v.get("status") == "rejected"]
    if not rejected:
        return []
    reasons = [f"{fmt_text(v.get('name'))} ({fmt_text(v.get('kind'))} of {fmt_text(v.get('parent'))}): "
               f"{fmt_text(v.get('reason'))}" for v in rejected]
    return [Callout(f"{_count(len(rejected), 'variant')} kept on disk under variants/ but not for shipping:",
                    title="Rejected by the guard", suggestions=reasons, tone="warn")]


def _variant_point(variant: dict[str, Any]) -> TradeoffPoint:
    return TradeoffPoint(
        label=fmt_text(variant.get("name")),
        accuracy=as_float((variant.get("metrics") or {}).get("accuracy")),
        latency_ms=as_float((variant.get("latency_ms") or {}).get("p50")),
        size_mb=as_float(variant.get("size_mb")),
        pareto=False,
        accepted=variant.get("status") != "rejected",
    )


# ---------------------------------------------------------------------------- selection


def _selection_blocks(data: dict[str, Any]) -> list[Block]:
    budget = data.get("budget") or {}
    options = _dicts(data.get("options"))
    chosen = data.get("chosen") if isinstance(data.get("chosen"), dict) else None
    blocks: list[Block] = [Text(_budget_line(budget)), _pick_callout(chosen, options, budget)]
    if not options:
        return blocks
    points = [_option_point(o, chosen) for o in options]
    if any(p.plottable for p in points):
        blocks.append(Figure(
            tradeoff_plot(points, max_latency_ms=as_float(budget.get("max_latency_ms")),
                          max_size_mb=as_float(budget.get("max_size_mb")), title="Every measured artifact"),
            alt="Accuracy against p50 latency of every candidate artifact, with the budget and the pick",
            caption=_pareto_caption(points, budget)))
    blocks.append(_options_table(options, chosen, budget))
    return blocks


def _pareto_caption(points: list[TradeoffPoint], budget: dict[str, Any]) -> str:
    keys = ["hollow: rejected by its guard"] if any(not p.accepted for p in points) else []
    if as_float(budget.get("max_size_mb")) is not None:
        keys.append("red outline: over the size limit")
    if as_float(budget.get("max_latency_ms")) is not None:
        keys.append("dashed line: the latency limit")
    if any(p.chosen for p in points):
        keys.append("green ring: the pick")
    if len(points) > MAX_PLOT_LABELS:
        keys.append("only the front and the pick are named")
    return ("Accuracy against p50 latency at batch 1 (log scale), all artifacts timed side by side; marker area "
            "is the model's size. Blue points form the Pareto front (accuracy vs latency vs size), joined by "
            "latency" + "".join(f"; {key}" for key in keys) + ".")


def _budget_terms(budget: dict[str, Any]) -> list[str]:
    latency, size = as_float(budget.get("max_latency_ms")), as_float(budget.get("max_size_mb"))
    return ([f"≤ {latency:g} ms"] if latency is not None else []) + ([f"≤ {size:g} MB"] if size is not None else [])


def _budget_line(budget: dict[str, Any]) -> str:
    latency, size = as_float(budget.get("max_latency_ms")), as_float(budget.get("max_size_mb"))
    limits = [f"p50 latency ≤ {latency:g} ms per image (batch 1, on this machine)"] if latency is not None else []
    limits += [f"model.onnx ≤ {size:g} MB"] if size is not None else []
    text = "Budget: " + (", ".join(limits) if limits else "no latency or size limit")
    max_drop = as_float(budget.get("max_drop"))
    if max_drop is not None:
        text += f"; each compression step may lose at most {_points(max_drop)}"
    return text + "."


def _option_label(option: dict[str, Any]) -> str:
    return f"{fmt_text(option.get('candidate'))}/{fmt_text(option.get('variant'))}"


def _same_option(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    return b is not None and (a.get("candidate"), a.get("variant")) == (b.get("candidate"), b.get("variant"))


def _pick_callout(chosen: dict[str, Any] | None, options: list[dict[str, Any]],
                  budget: dict[str, Any]) -> Callout:
    terms = " and ".join(_budget_terms(budget))
    if chosen is None:
        return Callout(_failure_message(options, budget), title="No artifact meets the budget", tone="bad")
    fitting = sum(bool(o.get("fits")) for o in options) or 1
    among = (("the only artifact" if fitting == 1 else f"the most accurate of the {fitting} artifacts")
             + (f" that meet {terms}" if terms else " that passed their guard"))
    message = (f"Picked {_option_label(chosen)}: {fmt_percent(chosen.get('accuracy'))} at "
               f"{fmt_ms(chosen.get('latency_ms'))} ms p50, {fmt_mb(chosen.get('size_mb'))} MB — {among}"
               f" ({_count(len(options), 'artifact')} measured).")
    accuracy = as_float(chosen.get("accuracy")) or 0.0
    better = sorted((o for o in options if (as_float(o.get("accuracy")) or 0.0) > accuracy),
                    key=lambda o: -(as_float(o.get("accuracy")) or 0.0))
    reasons = [f"{_option_label(o)} ({fmt_percent(o.get('accuracy'))}) is more accurate but "
               f"{_why_not(o, budget)}" for o in better[:4]]
    return Callout(message, title="Pick under the budget", suggestions=reasons, tone="ok")


def _budget_misses(option: dict[str, Any], budget: dict[str, Any]) -> list[str]:
    """The limits ``option`` exceeds, with its numbers."""
    misses = []
    latency, limit = as_float(option.get("latency_ms")), as_float(budget.get("max_latency_ms"))
    if latency is not None and limit is not None and latency > limit:
        misses.append(f"p50 {fmt_ms(latency)} ms > {limit:g} ms")
    size, limit = as_float(option.get("size_mb")), as_float(budget.get("max_size_mb"))
    if size is not None and limit is not None and size > limit:
        misses.append(f"{fmt_mb(size)} MB > {limit:g} MB")
    return misses


def _why_not(option: dict[str, Any], budget: dict[str, Any]) -> str:
    if option.get("status") == "rejected":
        return f"was rejected by its guard ({fmt_text(option.get('reason'))})"
    misses = _budget_misses(option, budget)
    return ("exceeds the budget: " + ", ".join(misses)) if misses else "does not fit"


def _failure_message(options: list[dict[str, Any]], budget: dict[str, Any]) -> str:
    """Which constraint failed and by how much, in the words ``lensforge select`` uses."""
    if not options:
        return "selection.json lists no measured artifacts."
    if not any(o.get("status") == "accepted" for o in options):
        return (f"All {_count(len(options), 'artifact')} were rejected by their guard (too much accuracy "
                "lost, or not faster than their parent), so none can be picked.")
    names = {f.name for f in fields(Option)}
    measured = [Option(**{key: value for key, value in o.items() if key in names}) for o in options]
    limits = Budget(**{key: value for key, value in budget.items()
                       if key in Budget.model_fields and value is not None})
    terms = " and ".join(_budget_terms(budget)) or "the budget"
    return (f"None of the {_count(len(options), 'measured artifact')} meets {terms}: "
            f"{explain_failure(measured, limits)}.")


def _option_point(option: dict[str, Any], chosen: dict[str, Any] | None) -> TradeoffPoint:
    return TradeoffPoint(
        label=_option_label(option), accuracy=as_float(option.get("accuracy")),
        latency_ms=as_float(option.get("latency_ms")), size_mb=as_float(option.get("size_mb")),
        pareto=bool(option.get("pareto")), accepted=option.get("status") != "rejected",
        chosen=_same_option(option, chosen),
    )


def _options_table(options: list[dict[str, Any]], chosen: dict[str, Any] | None,
                   budget: dict[str, Any]) -> Table:
    ranked = sorted(options, key=lambda o: (-(as_float(o.get("accuracy")) or 0.0),
                                            as_float(o.get("latency_ms")) or math.inf))
    rows, picked = [], []
    for i, option in enumerate(ranked):
        if _same_option(option, chosen):
            picked.append(i)
            note = "the pick"
        elif option.get("fits"):
            note = "fits, less accurate than the pick" if chosen else "fits"
        else:
            note = _why_not(option, budget)
        rows.append([fmt_text(option.get("candidate")), fmt_text(option.get("variant")),
                     fmt_percent(option.get("accuracy")), fmt_ms(option.get("latency_ms")),
                     fmt_mb(option.get("size_mb")), _fmt_status(option.get("status")),
                     "yes" if option.get("fits") else "no", "yes" if option.get("pareto") else "no", note])
    caption = "Every measured artifact, most accurate first" + ("; highlighted: the pick" if picked else "")
    return Table(("candidate", "variant", "accuracy", "p50 ms", "size MB", "status", "fits", "Pareto", "note"),
                 rows, caption=caption, numeric=(2, 3, 4), mono=(0, 1), highlight=picked)


# ---------------------------------------------------------------------------- benchmark


def _bench_blocks(run: RunFiles, data: dict[str, Any]) -> list[Block]:
    from lensforge.utils.hardware import CpuInfo  # torch-free; only when there is a bench.json

    try:
        cpu = CpuInfo.from_dict(data["cpu"])
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"{run.path(BENCH_FILE)}: 'cpu' is not a lensforge CPU description ({err})") from None
    rows = _dicts(data.get("rows"))
    blocks: list[Block] = [Text(_cpu_line(cpu)), Text(_model_line(data.get("model") or {}), muted=True)]
    if any(as_float(r.get("gflops")) for r in rows):
        blocks.append(Figure(utilisation_plot(rows, cpu.peak_gflops_fp32, cpu.peak_gops_int8),
                             alt="Achieved GFLOP/s per backend and precision at each batch size, "
                                 "against the CPU's estimated peak",
                             caption="Bars: achieved rate (giga-ops for int8, a multiply-add counts 2), "
                                     "labelled with its share of the estimated peak; lines: the peak "
                                     "estimated from the instruction set, clock and cores."))
    elif rows:
        blocks.append(Text("No FLOP count for this model: achieved rate and utilisation unknown.", muted=True))
    if rows:
        blocks.append(_bench_table(rows))
    notes = [str(n) for n in [*(data.get("notes") or []), *cpu.notes] if n]
    versions = ", ".join(f"{name} {version}" for name, version in (data.get("versions") or {}).items()
                         if version)
    if versions:
        notes.append(f"measured with {versions}")
    if notes:
        blocks.append(Text("Notes: " + " · ".join(dict.fromkeys(notes)), muted=True))
    return blocks


def _cpu_line(cpu: Any) -> str:
    """``CpuInfo.summary()`` with the int8 peak, the clock's source and the instruction sets."""
    text = f"CPU: {cpu.summary()}"
    if cpu.peak_gops_int8:
        text += f", {cpu.peak_gops_int8:.0f} GOP/s int8"
    if cpu.clock_source:
        text += f" (clock from {cpu.clock_source}; {_count(cpu.peak_cores, 'physical core')} counted)"
    return text + f". Instruction sets: {', '.join(cpu.isa) or 'none recognised'}."


def _model_line(model: dict[str, Any]) -> str:
    shape = model.get("input_shape") or []
    parts = [f"Model: {fmt_text(model.get('name'))} " + "×".join(fmt_int(d) for d in shape)]
    if as_float(model.get("params")) is not None:
        parts.append(f"{fmt_count(model['params'])} parameters")
    flops = as_float(model.get("flops_per_image"))
    if flops is not None:
        parts.append(f"{flops / 1e9:.3g} GFLOP per image (from {fmt_text(model.get('flops_source'))})")
    if as_float(model.get("size_mb")) is not None:
        parts.append(f"{fmt_mb(model['size_mb'])} MB ONNX")
    return ", ".join(parts) + "."


def _bench_table(rows: list[dict[str, Any]]) -> Table:
    columns = ("backend", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "GFLOP/s", "% of peak")
    cells = []
    for r in rows:
        gflops = as_float(r.get("gflops"))
        cells.append([fmt_text(r.get("backend")), fmt_text(r.get("precision")), fmt_int(r.get("batch")),
                      fmt_ms(r.get("latency_p50_ms")), fmt_ms(r.get("latency_p90_ms")),
                      fmt_ms(r.get("latency_p99_ms")), fmt_int(r.get("throughput_ips")),
                      MISSING if gflops is None else f"{gflops:.3g}", fmt_percent(r.get("utilisation"))])
    threads = sorted({fmt_int(r.get("threads")) for r in rows})
    caption = (f"Latency and throughput after warm-up, {', '.join(threads)} thread(s); "
               "% of peak is against the fp32 (or int8) estimate")
    return Table(columns, cells, caption=caption, numeric=range(2, len(columns)))


# ---------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class TradeoffPoint:
    """One artifact on the accuracy-vs-latency plot (accuracy a fraction, latency ms, size MB)."""

    label: str
    accuracy: float | None
    latency_ms: float | None
    size_mb: float | None
    pareto: bool
    accepted: bool
    chosen: bool = False

    @property
    def plottable(self) -> bool:
        return self.accuracy is not None and self.latency_ms is not None and self.latency_ms > 0


def tradeoff_plot(points: Sequence[TradeoffPoint], *, max_latency_ms: float | None = None,
                  max_size_mb: float | None = None, title: str = "") -> bytes:
    """Accuracy (%) against p50 latency (ms, log): marker area by size, the front joined, limits drawn."""
    shown = [p for p in points if p.plottable]
    sizes = [p.size_mb for p in shown if p.size_mb is not None and p.size_mb > 0]
    largest = max([*sizes, max_size_mb or 0.0]) or 1.0

    def area(size_mb: float | None) -> float:  # points²; sqrt keeps 100x apart sizes both visible
        return 18 + 420 * math.sqrt(max(size_mb or 0.0, 0.0) / largest)

    with plots._styled_figure(4.4) as fig:
        ax = fig.add_subplot()
        _tradeoff_axes(ax, shown, max_latency_ms)
        front = sorted((p for p in shown if p.pareto), key=lambda p: p.latency_ms or 0.0)
        if len(front) > 1:
            ax.plot([p.latency_ms for p in front], [100 * (p.accuracy or 0) for p in front], color=FRONT_COLOR,
                    linewidth=1.1, alpha=0.6, zorder=2)
        for p in shown:
            over_size = max_size_mb is not None and p.size_mb is not None and p.size_mb > max_size_mb
            color = FRONT_COLOR if p.pareto else OTHER_COLOR
            ax.scatter([p.latency_ms], [100 * (p.accuracy or 0)], s=area(p.size_mb), zorder=3,
                       facecolors=color if p.accepted else "white", alpha=0.9,
                       edgecolors=LIMIT_COLOR if over_size else color if not p.accepted else "white",
                       linewidths=1.6 if over_size or not p.accepted else 0.8)
            if p.chosen:
                ax.scatter([p.latency_ms], [100 * (p.accuracy or 0)], s=_ring_area(area(p.size_mb)), zorder=4,
                           facecolors="none", edgecolors=PICK_COLOR, linewidths=2.2)
        _tradeoff_legend(ax, shown, area, sizes, max_latency_ms, max_size_mb)
        if title:
            ax.set_title(title)
        labelled = [p for p in shown if len(shown) <= MAX_PLOT_LABELS or p.pareto or p.chosen]
        extents = {id(p): _ring_area(area(p.size_mb)) if p.chosen else area(p.size_mb) for p in shown}
        _place_labels(fig, ax, labelled, [extents[id(p)] for p in labelled], obstacles=shown,
                      obstacle_areas=[extents[id(p)] for p in shown])
        return plots.to_png(fig)


def _ring_area(marker_area: float) -> float:
    """The pick's ring around its marker (points²)."""
    return marker_area * 1.9 + 60


def _tradeoff_axes(ax: Axes, shown: Sequence[TradeoffPoint], max_latency_ms: float | None) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    latencies = [p.latency_ms or 1.0 for p in shown] + ([max_latency_ms] if max_latency_ms else [])
    low, high = min(latencies) / 1.8, max(latencies) * 1.8  # room for labels on both sides
    accuracy = [100 * (p.accuracy or 0) for p in shown]
    pad = max(0.6, 0.12 * (max(accuracy) - min(accuracy)))
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(min(accuracy) - pad, min(max(accuracy) + pad, 100 + pad))
    decades = math.log10(high / low)  # few decades: label 1-2-5 (or every) step, not just powers of 10
    subs = range(1, 10) if decades < 0.8 else (1.0, 2.0, 5.0) if decades < 2.5 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("p50 latency per image (ms, batch 1, log scale)")
    ax.set_ylabel("test accuracy (%), through ONNX")
    if max_latency_ms:
        ax.axvline(max_latency_ms, color=LIMIT_COLOR, linestyle="--", linewidth=1.2, zorder=1)
        ax.axvspan(max_latency_ms, high, color=LIMIT_COLOR, alpha=0.05, zorder=0)


def _tradeoff_legend(ax: Axes, shown: Sequence[TradeoffPoint], area: Callable[[float | None], float],
                     sizes: list[float], max_latency_ms: float | None, max_size_mb: float | None) -> None:
    from matplotlib.lines import Line2D

    def dot(label: str, face: str, edge: str, width: float = 0.8) -> Any:
        return ax.scatter([], [], s=60, facecolors=face, edgecolors=edge, linewidths=width, label=label)

    handles = [dot("Pareto front", FRONT_COLOR, "white")] if any(p.pareto for p in shown) else []
    if not all(p.pareto for p in shown):
        handles.append(dot("dominated", OTHER_COLOR, "white"))
    if any(not p.accepted for p in shown):
        handles.append(dot("rejected by its guard", "white", OTHER_COLOR, 1.6))
    if max_size_mb is not None and any((p.size_mb or 0) > max_size_mb for p in shown):
        handles.append(dot(f"over {max_size_mb:g} MB", OTHER_COLOR, LIMIT_COLOR, 1.6))
    if max_latency_ms:
        handles.append(Line2D([], [], color=LIMIT_COLOR, linestyle="--", label=f"latency limit {max_latency_ms:g} ms"))
    if any(p.chosen for p in shown):
        handles.append(dot("the pick", "none", PICK_COLOR, 2.2))
    for size in _reference_sizes(sizes):
        handles.append(ax.scatter([], [], s=area(size), facecolors="none", edgecolors="#777777",
                                  linewidths=0.8, label=f"{size:g} MB"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              labelspacing=1.1, borderpad=0.6, title="marker area: size", title_fontsize=7)


def _reference_sizes(sizes: list[float]) -> list[float]:
    """Up to three round sizes spanning the data, for the marker-size legend."""
    if not sizes:
        return []
    low, high = min(sizes), max(sizes)
    picks = [low, math.sqrt(low * high), high] if high / low > 3 else [high]
    rounded = [float(f"{size:.1g}") for size in picks]
    return sorted({size for size in rounded if size > 0})


def _place_labels(fig: MplFigure, ax: Axes, points: Sequence[TradeoffPoint], areas: Sequence[float], *,
                  obstacles: Sequence[TradeoffPoint], obstacle_areas: Sequence[float]) -> None:
    """Name each point where its label overlaps the fewest markers and other labels.

    Greedy: the pick first, then the front, then the rest by accuracy; each label tries
    eight places next to its marker, then two rings further out with a leader line.
    Covering another label costs more than covering a marker: text on text is unreadable.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()  # run the constrained layout so data -> pixel is final
    to_pixels, px_per_pt = ax.transData, fig.dpi / 72
    frame = ax.get_window_extent(renderer)
    blocked = [_circle_box(to_pixels, p, math.sqrt(a) / 2 * px_per_pt) for p, a in zip(obstacles, obstacle_areas)]
    order = sorted(range(len(points)), key=lambda i: (not points[i].chosen, not points[i].pareto,
                                                       -(points[i].accuracy or 0)))
    placed: list[Any] = []
    for i in order:
        point, radius_pt = points[i], math.sqrt(areas[i]) / 2
        own = _circle_box(to_pixels, point, radius_pt * px_per_pt)
        markers = [box for box in blocked if not _same_box(box, own)]
        spots = _label_spots(radius_pt)
        costs = [_spot_cost(ax, renderer, point, spot, markers, placed, frame) + rank * 1e-3  # ties: nearer
                 for rank, spot in enumerate(spots)]
        annotation = _annotate(ax, point, spots[int(np.argmin(costs))])
        placed.append(annotation.get_window_extent(renderer))


def _label_spots(radius_pt: float) -> list[tuple[float, float, str, str, bool]]:
    """(dx, dy in points, horizontal and vertical alignment, leader line), nearest first."""
    spots = []
    for gap, leader in ((radius_pt + 2.5, False), (radius_pt + 14, True), (radius_pt + 28, True)):
        diagonal = gap * 0.72
        spots += [(gap, 0.0, "left", "center", leader), (-gap, 0.0, "right", "center", leader),
                  (0.0, gap, "center", "bottom", leader), (0.0, -gap, "center", "top", leader),
                  (diagonal, diagonal, "left", "bottom", leader), (-diagonal, diagonal, "right", "bottom", leader),
                  (diagonal, -diagonal, "left", "top", leader), (-diagonal, -diagonal, "right", "top", leader)]
    return spots


def _spot_cost(ax: Axes, renderer: Any, point: TradeoffPoint, spot: tuple[float, float, str, str, bool],
               markers: list[Any], labels: list[Any], frame: Any) -> float:
    """Overlap (px²) of the label at ``spot`` with markers, with labels (3x) and outside the axes (5x)."""
    trial = _annotate(ax, point, spot[:4] + (False,))  # measured without its leader line
    box = trial.get_window_extent(renderer)
    trial.remove()
    covered = sum(_overlap(box, other) for other in markers) + 3 * sum(_overlap(box, other) for other in labels)
    outside = box.width * box.height - _overlap(box, frame)
    return covered + 5 * outside


def _annotate(ax: Axes, point: TradeoffPoint, spot: tuple[float, float, str, str, bool]) -> Any:
    dx, dy, horizontal, vertical, leader = spot
    annotation = ax.annotate(
        point.label, xy=(point.latency_ms, 100 * (point.accuracy or 0)), xytext=(dx, dy), textcoords="offset points",
        ha=horizontal, va=vertical, fontsize=7, annotation_clip=False, zorder=5,
        color="#1f2933" if point.pareto or point.chosen else "#66707a",
        fontweight="bold" if point.chosen else "normal",
        arrowprops={"arrowstyle": "-", "color": "#9aa5b1", "linewidth": 0.6, "shrinkA": 1, "shrinkB": 3}
        if leader else None)
    annotation.set_in_layout(False)  # labels must not move the axes they were measured on
    return annotation


def _circle_box(to_pixels: Any, point: TradeoffPoint, radius_px: float) -> Any:
    from matplotlib.transforms import Bbox

    x, y = to_pixels.transform((point.latency_ms, 100 * (point.accuracy or 0)))
    return Bbox.from_extents(x - radius_px, y - radius_px, x + radius_px, y + radius_px)


def _same_box(a: Any, b: Any) -> bool:
    return bool(np.allclose(a.extents, b.extents))


def _overlap(a: Any, b: Any) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def utilisation_plot(rows: Sequence[dict[str, Any]], peak_fp32: float | None, peak_int8: float | None) -> bytes:
    """Achieved GFLOP/s per backend/precision, grouped by batch, with the CPU's estimated peaks."""
    measured = [r for r in rows if as_float(r.get("gflops"))]
    series = list(dict.fromkeys((str(r.get("backend")), str(r.get("precision"))) for r in measured))
    batches = sorted({int(as_float(r.get("batch")) or 0) for r in measured})
    width = 0.8 / len(series)
    with plots._styled_figure(3.8) as fig:
        ax = fig.add_subplot()
        for k, (backend, precision) in enumerate(series):
            by_batch = {int(as_float(r.get("batch")) or 0): r for r in measured
                        if (str(r.get("backend")), str(r.get("precision"))) == (backend, precision)}
            xs = [j + (k - (len(series) - 1) / 2) * width for j, b in enumerate(batches) if b in by_batch]
            found = [by_batch[b] for b in batches if b in by_batch]
            bars = ax.bar(xs, [as_float(r.get("gflops")) for r in found], width=width * 0.92,
                          color=SERIES_COLORS[k % len(SERIES_COLORS)], hatch="///" if precision == "int8" else None,
                          edgecolor="white", linewidth=0.5, label=f"{backend} {precision}", zorder=2)
            ax.bar_label(bars, labels=[_fmt_share(r.get("utilisation")) for r in found], fontsize=6.5, padding=1.5)
        peaks = [(peak_fp32, "fp32 peak", "--")]
        if any(p == "int8" for _, p in series):
            peaks.append((peak_int8, "int8 peak", ":"))
        _peak_lines(ax, peaks)
        rates = [as_float(r.get("gflops")) or 0.0 for r in measured] + [p for p, _, _ in peaks if p]
        if max(rates) / min(r for r in rates if r > 0) > 30:  # a far-off peak would flatten the bars
            ax.set_yscale("log")
            ax.set_ylim(bottom=min(r for r in rates if r > 0) / 2, top=max(rates) * 2.5)
        else:
            ax.set_ylim(0, max(rates) * 1.2)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.grid(axis="x", visible=False)
        ax.set_ylabel("achieved GFLOP/s (int8: GOP/s)")
        ax.set_title("Achieved rate against the CPU's estimated peak (labels: % of peak)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
        return plots.to_png(fig)


def _fmt_share(utilisation: Any) -> str:
    share = as_float(utilisation)
    return "" if share is None else fmt_percent(share, 0 if share >= 0.095 else 1)


def _peak_lines(ax: Axes, peaks: list[tuple[float | None, str, str]]) -> None:
    for peak, label, style in peaks:
        if peak:
            unit = "GOP/s" if label.startswith("int8") else "GFLOP/s"
            ax.axhline(peak, color="#1f2933", linestyle=style, linewidth=1.1, zorder=3,
                       label=f"{label} ≈ {peak:,.0f} {unit}")
