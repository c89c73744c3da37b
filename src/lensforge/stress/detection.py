"""``stress`` for detectors: mAP under corruptions, the int8 gap, and box stability under small shifts.

Each (corruption, severity) of the suite is applied once to the evaluation images at the
model's input size; viewpoint corruptions move the ground-truth boxes with the pixels
(:func:`lensforge.ops.corruptions.boxes.corrupt_with_boxes`). The target and every comparison
bundle (e.g. the int8 variant) detect the *same* corrupted pixels; boxes are decoded by the
shipped NumPy code and scored against ground truth in each image's own pixels.

Metrics: mAP@[.5:.95] and mAP50 per corruption and severity; the error is 1 - mAP, and the
mean corruption error is its mean over the suite (Hendrycks & Dietterich's E(c, s) with mAP
in place of accuracy, as robustness benchmarks for detection such as Michaelis et al. 2019
report it); the relative drop is clean mAP minus corrupted mAP. Box stability: the images
shifted by 1-2 pixels (boxes with them), detections shifted back and matched to the clean
ones (same class, IoU >= 0.5): the share of clean detections lost or gained, and the mean
IoU of the matched pairs. Adversarial attacks and score calibration of detectors are not
built yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensforge.artifacts import Artifact, resolve_artifact
from lensforge.data.preprocess import letterbox_scale
from lensforge.data.sources import open_source
from lensforge.data.table import load_table
from lensforge.errors import DataError
from lensforge.evaluate.detection import detection_metrics, match_image
from lensforge.evaluate.detection_runner import DetectorTarget, open_detector, original_targets
from lensforge.ops.corruptions import suite_plan
from lensforge.ops.corruptions.boxes import corrupt_with_boxes
from lensforge.tasks.detection import BoxTarget, Detections, postprocess
from lensforge.utils.io import atomic_write_json
from lensforge.utils.progress import StepProgress

SHIFTS_PX = ((1, 0), (0, 1), (-1, 0), (0, -1), (2, 0), (0, 2))
STABLE_IOU = 0.5


def _detect(target: DetectorTarget, images: np.ndarray, scales: list[float], sizes: list[tuple[int, int]],
            batch_size: int, threshold: float | None = None) -> list[Detections]:
    threshold = target.head.eval_score_floor if threshold is None else threshold
    found: list[Detections] = []
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        found += postprocess(target.raw(np.ascontiguousarray(images[part])), target.head, scales=scales[part],
                             sizes=sizes[part], score_threshold=threshold)
    return found


def _scores(predictions: list[Detections], targets: list[BoxTarget], class_names: list[str]) -> dict[str, Any]:
    metrics = detection_metrics(predictions, targets, class_names)
    return {"map": metrics["map"], "map50": metrics["map50"]}


def _corrupted_targets(targets: list[BoxTarget], moved: list[np.ndarray], kept: list[np.ndarray],
                       scales: list[float], sizes: list[tuple[int, int]] | None = None) -> list[BoxTarget]:
    """Moved boxes (input pixels) back to original pixels, clipped to each image (not its letterbox
    padding), with the labels of the boxes still there."""
    out = []
    for i, (target, boxes, keep, scale) in enumerate(zip(targets, moved, kept, scales)):
        original, labels = boxes / np.float32(scale), target.labels[keep]
        if sizes is not None:
            width, height = sizes[i]
            original = np.clip(original, 0, np.array([width, height, width, height], dtype=np.float32))
            solid = (original[:, 2] - original[:, 0] >= 1) & (original[:, 3] - original[:, 1] >= 1)
            original, labels = original[solid], labels[solid]
        out.append(BoxTarget(original, labels))
    return out


def stress_detector(artifact: Artifact, data: str | None = None, *, cfg: Any = None,
                    reference: str | Path | None = None, compare: list[str | Path] | None = None,
                    json_out: str | Path | None = None, write: bool = True, show_progress: bool = True) -> Any:
    """The corruption suite and box stability of a detection run or bundle (see the module doc)."""
    from lensforge.errors import UsageError
    from lensforge.evaluate.runner import select_split
    from lensforge.stress.suite import StressConfig, StressResult, _auto_compare

    if reference is not None:
        raise UsageError("--reference (mCE against a reference model) is not built for detectors yet: drop it")
    cfg = cfg or StressConfig()
    plan = suite_plan(cfg.suite)
    main = open_detector(artifact, cfg.batch_size)
    data_spec = data or main.data
    if data_spec is None:
        raise DataError("the bundle is outside a run: pass --data to say which images to use")
    source = open_source(data_spec)
    table = load_table(source, main.preprocess)
    indices = select_split(table, main, source.spec, cfg.split, cfg.seed)  # type: ignore[arg-type]
    if cfg.max_images and len(indices) > cfg.max_images:
        indices = np.sort(np.random.default_rng(cfg.seed).permutation(indices)[:cfg.max_images])
    if len(indices) == 0:
        raise DataError(f"split '{cfg.split}' of '{data_spec}' is empty")
    images = table.images[indices]
    sizes = [tuple(int(v) for v in table.sizes[i]) for i in indices]
    scales = [letterbox_scale(size, main.preprocess.input_size) for size in sizes]
    targets = original_targets(table, indices, main.class_names)
    models = {"target": main, **{str(p): open_detector(resolve_artifact(p, run_dir=main.run_dir), cfg.batch_size)
                                 for p in (compare if compare is not None else _auto_compare(artifact.path, main))}}
    results: dict[str, dict[str, Any]] = {name: {} for name in models}
    with StepProgress("stress", len(plan) + 1, enabled=show_progress) as advance:
        for name, model in models.items():
            results[name]["clean"] = _scores(_detect(model, images, scales, sizes, cfg.batch_size), targets,
                                             main.class_names)
        advance("clean")
        for corruption, severity in plan:
            pixels, moved, kept = corrupt_with_boxes(torch.from_numpy(images), [t.boxes * s for t, s in
                                                                                 zip(targets, scales)],
                                                     corruption, severity, seed=cfg.seed)
            moved_targets = _corrupted_targets(targets, moved, kept, scales, sizes)
            for name, model in models.items():
                found = _detect(model, pixels.numpy(), scales, sizes, cfg.batch_size)
                results[name][f"{corruption}@{severity}"] = _scores(found, moved_targets, main.class_names)
            advance(f"{corruption} s{severity}")
    summary = _summary(results, plan, cfg, artifact, data_spec, len(indices))
    if cfg.stability:
        summary["stability"] = box_stability(main, images, scales, sizes, cfg.batch_size)
    out = None
    if write and main.run_dir is not None:
        out = atomic_write_json(main.run_dir / "stress" / "corruptions.json", summary)
    if json_out is not None:
        out = atomic_write_json(json_out, summary)
    return StressResult(summary, out)


def _table(scores: dict[str, dict[str, Any]], plan: list[tuple[str, int]]) -> dict[str, Any]:
    """Per corruption: mAP per severity and the mean; the mean corruption error over the suite."""
    per: dict[str, Any] = {}
    for name, severity in plan:
        entry = per.setdefault(name, {"map": {}, "map50": {}})
        entry["map"][str(severity)] = scores[f"{name}@{severity}"]["map"]
        entry["map50"][str(severity)] = scores[f"{name}@{severity}"]["map50"]
    for entry in per.values():
        values = [v for v in entry["map"].values() if v is not None]
        entry["mean_map"] = float(np.mean(values)) if values else None
    errors = [1 - scores[f"{n}@{s}"]["map"] for n, s in plan if scores[f"{n}@{s}"]["map"] is not None]
    clean = scores["clean"]["map"]
    return {"clean": scores["clean"], "corruptions": per,
            "mean_corruption_error": float(np.mean(errors)) if errors else None,
            "mean_drop": float(clean - (1 - np.mean(errors))) if errors and clean is not None else None}


def _summary(results: dict[str, dict[str, Any]], plan: list[tuple[str, int]], cfg: Any, artifact: Artifact,
             data_spec: str, num_images: int) -> dict[str, Any]:
    main = _table(results["target"], plan)
    summary: dict[str, Any] = {"task": "detection", "kind": artifact.kind, "data": data_spec, "split": cfg.split,
                               "suite": cfg.suite, "seed": cfg.seed, "num_images": num_images,
                               "metric": "map", "severities": sorted({s for _, s in plan}),
                               "path": str(artifact.path), **main, "compare": []}
    for name, scores in results.items():
        if name == "target":
            continue
        other = _table(scores, plan)
        gap = {key: (main["clean"][key] - other["clean"][key])
               if main["clean"][key] is not None and other["clean"][key] is not None else None
               for key in ("map", "map50")}
        summary["compare"].append({"path": name, **other, "gap_clean_points": {
            k: None if v is None else round(100 * v, 2) for k, v in gap.items()}})
    return summary


def box_stability(target: DetectorTarget, images: np.ndarray, scales: list[float], sizes: list[tuple[int, int]],
                  batch_size: int) -> dict[str, Any]:
    """Detections under 1-2 pixel shifts, matched back to the clean ones (see the module doc)."""
    threshold = target.head.score_threshold
    clean = _detect(target, images, scales, sizes, batch_size, threshold)
    changed, clean_count, ious = 0, sum(len(d) for d in clean), []
    for dx, dy in SHIFTS_PX:
        shifted = np.roll(images, (dy, dx), axis=(2, 3))  # wrap-around: the 1-2 px strip is negligible
        found = _detect(target, shifted, scales, sizes, batch_size, threshold)
        for before, after, scale in zip(clean, found, scales):
            back = after.boxes - np.array([dx, dy, dx, dy], dtype=np.float32) / np.float32(scale)
            as_target = BoxTarget(before.boxes, before.labels)
            matched = match_image(Detections(back, after.scores, after.labels), as_target, STABLE_IOU)
            hits = matched[matched >= 0]
            changed += (len(before) - len(hits)) + int((matched < 0).sum())  # lost + appeared
            if len(hits):
                from lensforge.tasks.detection import box_iou

                ious.extend(np.diag(box_iou(back[matched >= 0], before.boxes[hits])).tolist())
    shifts = len(SHIFTS_PX)
    return {"shifts_px": [list(s) for s in SHIFTS_PX], "score_threshold": threshold,
            "changed_per_clean_detection": changed / max(1, clean_count * shifts),
            "mean_matched_iou": float(np.mean(ious)) if ious else None, "clean_detections": clean_count}
