"""The Robustness section: corruptions, adversarial curves, calibration, OOD, selective
prediction and adaptation, from the files ``lensforge stress/calibrate/guard/adapt`` write
under ``RUN/stress/``. Each file adds one group; the section is left out when none exists.
Files are read as plain JSON: torch is never imported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lensforge.errors import ArtifactError
from lensforge.report import plots, robustness_plots
from lensforge.report.blocks import Block, Callout, Figure, Group, Section, Stat, Stats, Table, Text
from lensforge.report.formatting import MISSING, as_float, fmt_number, fmt_percent, fmt_text
from lensforge.report.registry import register_section
from lensforge.report.runfiles import RunFiles

CORRUPTIONS_FILE = "stress/corruptions.json"
ADVERSARIAL_FILE = "stress/adversarial.json"
CALIBRATION_FILE = "stress/calibration.json"
OOD_FILE = "stress/ood.json"
ADAPT_FILE = "stress/adapt.json"


@register_section("robustness", order=48)
def robustness_section(run: RunFiles) -> Section | None:
    """One group per stress file present."""
    builders = ((CORRUPTIONS_FILE, "Corruptions and shifts", _corruption_blocks),
                (ADVERSARIAL_FILE, "Adversarial robustness", _adversarial_blocks),
                (CALIBRATION_FILE, "Calibration", _calibration_blocks),
                (OOD_FILE, "Out-of-distribution detection and selective prediction", _ood_blocks),
                (ADAPT_FILE, "Domain adaptation", _adapt_blocks))
    groups: list[Block] = []
    for relpath, title, build in builders:
        data = run.json(relpath)
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ArtifactError(f"{run.path(relpath)} should hold a JSON object")
        groups.append(Group(title, build(data)))
    return Section("Robustness", groups) if groups else None


def _points(value: Any) -> str:
    number = as_float(value)
    return MISSING if number is None else f"{number:+.2f}"


# ---------------------------------------------------------------------------- corruptions


def _corruption_blocks(data: dict[str, Any]) -> list[Block]:
    if data.get("task") == "detection":
        return _detection_corruption_blocks(data)
    corruptions = data.get("corruptions") or {}
    severities = [str(s) for s in data.get("severities") or []]
    names = list(corruptions)
    blocks: list[Block] = [Text(
        f"{fmt_text(data.get('suite'))} suite on {fmt_text(data.get('num_images'))} {fmt_text(data.get('split'))} "
        f"images of {fmt_text(data.get('data'))}, measured on the {fmt_text(data.get('precision'))} "
        f"{fmt_text(data.get('kind'))}; every model below saw the same corrupted pixels.")]
    stats = [Stat("Clean accuracy", fmt_percent(data.get("clean_accuracy"))),
             Stat("Mean corruption error", fmt_percent(data.get("mean_corruption_error")),
                  note="mean error over every corruption and severity")]
    if as_float(data.get("mce")) is not None:
        stats.append(Stat("mCE", fmt_percent(data.get("mce")),
                          note=f"vs {fmt_text((data.get('reference') or {}).get('target'))}; relative mCE "
                               f"{fmt_percent(data.get('relative_mce'))}"))
    stability = (data.get("stability") or {}).get("target") or {}
    if stability:
        stats.append(Stat("Prediction flips", fmt_percent(stability.get("translate_flip_rate")),
                          note=f"under 1-2 px shifts; {fmt_percent(stability.get('jitter_flip_rate'))} under jitter"))
    blocks.append(Stats(stats))
    if names and severities:
        matrix = np.array([[as_float(corruptions[n].get("accuracy", {}).get(s)) or np.nan for s in severities]
                           for n in names], dtype=float)
        blocks.append(Figure(robustness_plots.corruption_heatmap(names, severities, matrix,
                                                                 as_float(data.get("clean_accuracy"))),
                             alt="Heatmap of accuracy per corruption and severity",
                             caption="Accuracy per corruption (rows) and severity (columns) on the shipped artifact."))
    blocks += _gap_blocks(data)
    per_ce = (data.get("per_corruption") or {})
    rows = [[n, fmt_text(corruptions[n].get("family")),
             fmt_percent(1 - (as_float(corruptions[n].get("error_mean")) or 0)),
             fmt_percent((per_ce.get(n) or {}).get("ce")), fmt_percent((per_ce.get(n) or {}).get("relative_ce"))]
            for n in names]
    blocks.append(Table(("corruption", "family", "mean accuracy", "CE", "relative CE"), rows,
                        caption="Per corruption (CE columns need a reference model)", numeric=(2, 3, 4),
                        collapsed=True))
    return blocks


def _detection_corruption_blocks(data: dict[str, Any]) -> list[Block]:
    """A detector's suite: mAP per corruption and severity, the mean, box stability, int8 gaps."""
    corruptions = data.get("corruptions") or {}
    severities = [str(s) for s in data.get("severities") or []]
    names = list(corruptions)
    clean = (data.get("clean") or {}).get("map")
    blocks: list[Block] = [Text(
        f"{fmt_text(data.get('suite'))} suite on {fmt_text(data.get('num_images'))} {fmt_text(data.get('split'))} "
        f"images of {fmt_text(data.get('data'))}, measured on the {fmt_text(data.get('kind'))}; viewpoint "
        "corruptions move the boxes with the pixels.")]
    stability = data.get("stability") or {}
    mean_error = as_float(data.get("mean_corruption_error"))
    stats = [Stat("Clean mAP@[.5:.95]", fmt_number(clean)),
             Stat("Mean mAP under corruption", fmt_number(None if mean_error is None else 1 - mean_error),
                  note="mean over every corruption and severity")]
    if stability:
        stats.append(Stat("Detections changed", fmt_percent(stability.get("changed_per_clean_detection")),
                          note=f"per clean detection under 1-2 px shifts; matched IoU "
                               f"{fmt_number(stability.get('mean_matched_iou'))}"))
    blocks.append(Stats(stats))
    if names and severities:
        matrix = np.array([[as_float((corruptions[n].get("map") or {}).get(s)) or np.nan for s in severities]
                           for n in names], dtype=float)
        blocks.append(Figure(robustness_plots.corruption_heatmap(names, severities, matrix, as_float(clean),
                                                                 metric="mAP@[.5:.95]"),
                             alt="Heatmap of mAP per corruption and severity",
                             caption="mAP@[.5:.95] per corruption (rows) and severity (columns) on the shipped "
                                     "artifact."))
    for other in data.get("compare") or []:
        gap = other.get("gap_clean_points") or {}
        blocks.append(Callout(f"{fmt_text(other.get('path'))}: {_points(gap.get('map'))} mAP points lost on clean "
                              f"images ({_points(gap.get('map50'))} mAP50 points)",
                              title="Gap of a compressed variant", tone="info"))
    return blocks


def _gap_blocks(data: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = []
    for other in data.get("compare") or []:
        gap = other.get("gap") or {}
        per = gap.get("per_corruption_points") or {}
        worst = sorted(per.items(), key=lambda kv: -(as_float(kv[1]) or 0))[:5]
        text = (f"{fmt_text(other.get('precision'))} bundle {fmt_text(other.get('target'))}: "
                f"{_points(gap.get('clean_points'))} points lost on clean images, {_points(gap.get('mean_points'))} "
                f"on average under corruption; largest gaps: "
                + ", ".join(f"{name} {_points(points)}" for name, points in worst))
        extra_loss = (as_float(gap.get("mean_points")) or 0) - (as_float(gap.get("clean_points")) or 0)
        tone = "warn" if extra_loss > 1 else "info"  # loses clearly more under corruption than clean
        blocks.append(Callout(text, title="Robustness gap of a compressed variant", tone=tone))
    return blocks


# ---------------------------------------------------------------------------- adversarial


def _adversarial_blocks(data: dict[str, Any]) -> list[Block]:
    attacks = data.get("attacks") or {}
    blocks: list[Block] = [Text(
        f"White-box attacks on the PyTorch model ({fmt_text((data.get('settings') or {}).get('steps'))} steps); "
        f"clean accuracy {fmt_percent(data.get('clean_accuracy'))}.")]
    if attacks:
        blocks.append(Figure(robustness_plots.epsilon_curves(attacks), alt="Robust accuracy against epsilon",
                             caption="Robust accuracy against the attack budget; a curve that rises with epsilon, "
                                     "or a stronger attack doing worse than FGSM, points to gradient masking."))
    transfer = data.get("transfer") or {}
    if transfer:
        rows = [[name, fmt_number(eps, 4), fmt_percent(torch_acc), fmt_percent(bundle_acc)]
                for name, entry in transfer.items()
                for eps, torch_acc, bundle_acc in zip(entry.get("epsilons") or [], entry.get("torch") or [],
                                                      entry.get("bundle") or [])]
        blocks.append(Table(("attack", "epsilon", "PyTorch", "bundle (ONNX)"), rows, numeric=(1, 2, 3),
                            caption="Adversarial images crafted on PyTorch, quantised to 8 bits and sent to the bundle",
                            collapsed=True))
    for warning in data.get("warnings") or []:
        blocks.append(Callout(str(warning), title="Possible gradient masking", tone="warn"))
    return blocks


# ---------------------------------------------------------------------------- calibration


def _calibration_blocks(data: dict[str, Any]) -> list[Block]:
    held_out = data.get("test") or data.get("val") or {}
    which = "test" if data.get("test") else "val"
    before, after = held_out.get("before") or {}, held_out.get("after") or {}
    blocks: list[Block] = [
        Stats([Stat("Temperature", fmt_number(data.get("temperature"), 3), note="fitted on the validation split"),
               Stat(f"ECE ({which})", f"{fmt_percent(before.get('ece'))} → {fmt_percent(after.get('ece'))}",
                    tone="ok" if (as_float(after.get("ece")) or 1) <= (as_float(before.get("ece")) or 0) else "warn"),
               Stat(f"NLL ({which})", f"{fmt_number(before.get('nll'))} → {fmt_number(after.get('nll'))}")]),
    ]
    for label, state in (("before", before), ("after", after)):
        if state.get("reliability"):
            blocks.append(Figure(plots.reliability_diagram(state["reliability"], state.get("ece")),
                                 alt=f"Reliability diagram {label} temperature scaling",
                                 caption=f"{which} split, {label} temperature scaling (15 bins)", width_px=340))
    return blocks


# ---------------------------------------------------------------------------- OOD and selective prediction


def _ood_blocks(data: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = []
    chosen = str(data.get("chosen"))
    detectors = {name: entry for name, entry in (data.get("detectors") or {}).items() if isinstance(entry, dict)}
    gain = as_float(data.get("gain_over_msp_auroc_points"))
    abstain = data.get("abstain") or {}
    quality = data.get("quality") or {}
    mean_auroc = (detectors.get(chosen) or {}).get("mean_auroc")
    blocks.append(Stats([
        Stat("OOD detector AUROC", fmt_number(mean_auroc), note=f"{chosen} (shipped), threshold "
                                                              f"{fmt_number(data.get('threshold'), 4)} keeps 95% of "
                                                              "in-distribution images"),
        Stat("Gain over max-softmax", MISSING if gain is None else f"{gain:+.1f}", note="mean AUROC points",
             tone="ok" if (gain or 0) > 0 else ""),
        Stat("Abstain below", fmt_number(abstain.get("threshold"), 3),
             note=f"{fmt_percent((abstain.get('validation') or {}).get('coverage'))} coverage on validation"),
        Stat("Quality flags", fmt_percent((quality.get("flag_rate_in_distribution") or {}).get("any")),
             note="of in-distribution images"),
    ]))
    if detectors:
        sets = list(next(iter(detectors.values())).get("auroc") or {})
        def cell(entry: dict[str, Any], name: str) -> str:
            auroc, fpr = (entry.get("auroc") or {}).get(name), (entry.get("fpr95") or {}).get(name)
            return f"{fmt_number(auroc)} / {fmt_number(fpr, 2)}"

        rows = [[det + (" ✓" if det == chosen else ""), *(cell(entry, s) for s in sets),
                 fmt_number(entry.get("mean_auroc"))] for det, entry in detectors.items()]
        blocks.append(Table(("detector", *sets, "mean AUROC"), rows, numeric=range(1, len(sets) + 2),
                            caption=f"AUROC / FPR at 95% TPR per OOD set on the {fmt_text(data.get('split'))} split "
                                    "(✓: the detector shipped in the bundle)"))
    histogram = (data.get("histograms") or {}).get(chosen) or {}
    counts = histogram.get("counts") or {}
    if counts and histogram.get("edges"):
        per_set = {name: {"edges": histogram["edges"], "counts": c} for name, c in counts.items()}
        blocks.append(Figure(robustness_plots.score_histograms(per_set, as_float(data.get("threshold")), chosen),
                             alt="Histograms of OOD scores",
                             caption="Scores of in-distribution images and of each OOD set; the dashed line is "
                                     "the shipped threshold."))
    selective = data.get("selective") or {}
    curve = selective.get("curve") or {}
    if curve.get("coverage"):
        validation = abstain.get("validation") or {}
        point = (as_float(validation.get("coverage")), as_float(validation.get("risk")))
        blocks.append(Figure(robustness_plots.risk_coverage(curve["coverage"], curve["risk"],
                                                            point if None not in point else None),
                             alt="Risk-coverage curve", width_px=460,
                             caption=f"Selective prediction by calibrated confidence; AURC "
                                     f"{fmt_number(selective.get('aurc'), 4)}."))
    return blocks


# ---------------------------------------------------------------------------- adaptation


def _adapt_blocks(data: dict[str, Any]) -> list[Block]:
    target, source = data.get("target_accuracy") or {}, data.get("source_accuracy") or {}
    after_target = target.get("after_bundle", target.get("after"))
    split = data.get("split") or {}
    reduction = as_float(data.get("target_error_reduction"))
    blocks: list[Block] = [
        Text(f"Adapted with {fmt_text(data.get('method'))} from {fmt_text(data.get('source_run'))} to "
             f"{fmt_text(data.get('target'))}: {fmt_text(split.get('adapt'))} target images to adapt on "
             f"({fmt_text(split.get('labelled'))} labelled), {fmt_text(split.get('held_out'))} held out to score."),
        Stats([Stat("Target accuracy", f"{fmt_percent(target.get('before'))} → {fmt_percent(after_target)}",
                    note="held-out target images, adapted bundle", tone="ok" if (reduction or 0) > 0 else "warn"),
               Stat("Target error cut", MISSING if reduction is None else f"{reduction:.0%}", note="relative"),
               Stat("Source accuracy", f"{fmt_percent(source.get('before'))} → {fmt_percent(source.get('after'))}",
                    note="a drop is forgetting",
                    tone="warn" if (as_float(data.get("forgetting")) or 0) > 0.01 else "")]),
    ]
    if target or source:
        blocks.append(Figure(robustness_plots.before_after_bars(
            ["target", "source"], [target.get("before"), source.get("before")], [after_target, source.get("after")],
            "Accuracy before and after adaptation"), alt="Accuracy before and after adaptation", width_px=460,
            caption="Target: held-out images of the new domain; source: the original test split."))
    return blocks
