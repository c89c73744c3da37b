"""``evaluate`` for detectors: COCO metrics of a run or a bundle on a split, in original-image pixels.

A bundle runs through ONNX Runtime and its boxes are decoded by the same NumPy code that
``predict`` and the server use (:func:`lensforge.tasks.detection.postprocess`), so the mAP
is the shipped artifact's. A run runs its PyTorch export module, decoded the same way.
Ground truth comes back from the table's input pixels to each image's own pixels (COCO's
small/medium/large areas are the original image's). Precision, recall and F1 are at the
score threshold the artifact ships (chosen on validation for the best F1); the results go to
``eval/<split>.json`` with PR curves, the confusion matrix and a gallery of the worst images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.artifacts import Artifact
from lensforge.data.preprocess import Preprocess, letterbox_scale
from lensforge.data.sources import open_source
from lensforge.data.table import ImageTable, load_table
from lensforge.errors import DataError, UsageError
from lensforge.evaluate.detection import (
    MATCH_IOU,
    confusion_matrix,
    detection_metrics,
    match_image,
    pr_curves,
    worst_images,
)
from lensforge.tasks.detection import BoxTarget, DetectionHead, Detections, postprocess
from lensforge.utils.io import atomic_write_bytes, atomic_write_json

RawPredictor = Callable[[np.ndarray], dict[str, np.ndarray]]  # uint8 (N, C, H, W) -> raw outputs by name
GALLERY_IMAGES = 8


@dataclass
class DetectorTarget:
    """A detector to evaluate: raw outputs from uint8 pixels, its head, classes and preprocessing."""

    kind: str  # "run" or "bundle"
    raw: RawPredictor
    head: DetectionHead
    class_names: list[str]
    preprocess: Preprocess
    run_dir: Path | None
    data: str | None


def open_detector(artifact: Artifact, batch_size: int = 64) -> DetectorTarget:
    info = artifact.run_info()
    if artifact.is_bundle:
        from lensforge.deploy.bundle import load_bundle

        bundle = load_bundle(artifact.path)
        return DetectorTarget("bundle", bundle.outputs_uint8, DetectionHead.from_dict(bundle.manifest["detection"]),
                              list(bundle.class_names), bundle.preprocess, artifact.run_dir, info.get("data"))
    from lensforge.train.run import load_run

    run = load_run(artifact.path)
    return DetectorTarget("run", _torch_raw(run.export_module(), run.preprocess), DetectionHead.from_dict(
        run.info["detection"]), run.class_names, run.preprocess, artifact.path, run.info.get("data"))


def _torch_raw(net: Any, pre: Preprocess) -> RawPredictor:
    import torch

    from lensforge.models.normalize import Normalize

    normalize = Normalize(pre.mean, pre.std)

    @torch.no_grad()
    def raw(images: np.ndarray) -> dict[str, np.ndarray]:
        net.eval()
        outputs = net(normalize(torch.from_numpy(images)))
        return {name: value.float().numpy() for name, value in zip(net.output_names, outputs)}

    return raw


def detect_table(target: DetectorTarget, table: ImageTable, indices: np.ndarray, *, batch_size: int = 64,
                 score_threshold: float | None = None) -> list[Detections]:
    """Detections (original pixels) of the table's images ``indices``; default threshold: the mAP floor."""
    threshold = target.head.eval_score_floor if score_threshold is None else score_threshold
    sizes = [tuple(int(v) for v in table.sizes[i]) for i in indices]
    scales = [letterbox_scale(size, target.preprocess.input_size) for size in sizes]
    found: list[Detections] = []
    for start in range(0, len(indices), batch_size):
        part = slice(start, start + batch_size)
        raw = target.raw(np.ascontiguousarray(table.images[indices[part]]))
        found += postprocess(raw, target.head, scales=scales[part], sizes=sizes[part], score_threshold=threshold)
    return found


def original_targets(table: ImageTable, indices: np.ndarray, class_names: list[str]) -> list[BoxTarget]:
    """Ground truth of ``indices`` in each image's own pixels, labels in the model's class order."""
    mapping = _class_mapping(table.class_names, class_names)
    out = []
    for i in indices:
        target = table.targets[i]
        scale = letterbox_scale(tuple(int(v) for v in table.sizes[i]), table.preprocess.input_size)
        out.append(BoxTarget(target.boxes / np.float32(scale), mapping[target.labels]))
    return out


def _class_mapping(data_names: list[str], model_names: list[str]) -> np.ndarray:
    unknown = sorted(set(data_names) - set(model_names))
    if unknown:
        raise DataError(f"data classes {unknown[:5]} are not among the detector's classes {model_names[:10]}")
    return np.array([model_names.index(name) for name in data_names] or [0], dtype=np.int64)


def precision_recall_at(predictions: list[Detections], targets: list[BoxTarget], threshold: float,
                        iou: float = MATCH_IOU) -> dict[str, float]:
    """Precision, recall and F1 of the detections scoring at or above ``threshold``."""
    kept = [p.above(threshold) for p in predictions]
    true_positives = sum(int((match_image(p, t, iou) >= 0).sum()) for p, t in zip(kept, targets))
    detections, objects = sum(len(p) for p in kept), sum(len(t) for t in targets)
    precision = true_positives / detections if detections else 0.0
    recall = true_positives / objects if objects else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "score_threshold": threshold, "iou": iou}


def evaluate_detector(artifact: Artifact, data: str | None = None, *, split: str = "test", batch_size: int = 64,
                      on_bad_image: str = "fail", seed: int = 0, write: bool = True, mistakes: int = GALLERY_IMAGES,
                      ) -> Any:
    """COCO metrics of a detection run or bundle on ``split`` (see the module doc); an :class:`EvalResult`."""
    from lensforge.evaluate.runner import EvalResult, select_split

    target = open_detector(artifact, batch_size)
    data_spec = data or target.data
    if data_spec is None:
        raise UsageError("the bundle is outside a run: pass --data to say which images to use")
    source = open_source(data_spec)
    table = load_table(source, target.preprocess, on_bad_image=on_bad_image)
    indices = select_split(table, target, source.spec, split, seed)  # type: ignore[arg-type]
    if len(indices) == 0:
        raise DataError(f"split '{split}' of '{data_spec}' is empty")
    predictions = detect_table(target, table, indices, batch_size=batch_size)
    targets = original_targets(table, indices, target.class_names)
    metrics: dict[str, Any] = {
        "split": split, "evaluated": target.kind, "data": data_spec, "task": "detection", "images": len(indices),
        "objects": int(sum(len(t) for t in targets)),
        **detection_metrics(predictions, targets, target.class_names),
        **precision_recall_at(predictions, targets, target.head.score_threshold),
    }
    matrix = confusion_matrix(predictions, targets, len(target.class_names),
                              score_threshold=target.head.score_threshold)
    metrics["confusion_matrix"] = matrix.tolist()
    out = None
    if write and target.run_dir is not None:
        metrics["plots"] = _write_plots(target, table, indices, predictions, targets, split, mistakes)
        out = atomic_write_json(target.run_dir / "eval" / f"{split}.json", metrics)
    return EvalResult(metrics, out)


def _write_plots(target: DetectorTarget, table: ImageTable, indices: np.ndarray, predictions: list[Detections],
                 targets: list[BoxTarget], split: str, limit: int) -> dict[str, str]:
    from lensforge.report.detection_plots import (
        detection_confusion_matrix,
        error_gallery,
        precision_recall_curves,
    )

    assert target.run_dir is not None
    folder = target.run_dir / "eval"
    threshold = target.head.score_threshold
    files = {
        "pr_curves": precision_recall_curves(pr_curves(predictions, targets, target.class_names)),
        "confusion_matrix": detection_confusion_matrix(
            confusion_matrix(predictions, targets, len(target.class_names), score_threshold=threshold),
            target.class_names),
    }
    worst = worst_images(predictions, targets, limit, score_threshold=threshold)
    if worst:  # drawn on the letterboxed model input: boxes scaled from original pixels
        scales = [letterbox_scale(tuple(int(v) for v in table.sizes[indices[w.index]]), target.preprocess.input_size)
                  for w in worst]
        files["worst_images"] = error_gallery(
            [table.images[indices[w.index]] for w in worst], [w.tp_boxes * s for w, s in zip(worst, scales)],
            [w.fp_boxes * s for w, s in zip(worst, scales)], [w.missed_boxes * s for w, s in zip(worst, scales)],
            titles=[f"{w.error_count} errors" for w in worst])
    written = {}
    for name, png in files.items():
        path = folder / f"{split}_{name}.png"
        atomic_write_bytes(path, png)
        written[name] = f"eval/{path.name}"
    return written


__all__ = ["DetectorTarget", "detect_table", "evaluate_detector", "open_detector", "original_targets",
           "precision_recall_at"]
