"""``evaluate(target, data, split)``: metrics of a run or a bundle on a split of a source.

A bundle is evaluated through ONNX Runtime, i.e. on the artifact that ships; a
run through its PyTorch model. Results go to ``eval/<split>.json`` in the run
folder (for a bundle inside a run, in that run), with PNGs of the most
confident mistakes for the report's gallery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.data.preprocess import Preprocess, array_to_image
from lensforge.data.sources import open_source
from lensforge.data.splits import load_splits, make_splits
from lensforge.data.table import ImageTable, load_table
from lensforge.errors import DataError, UsageError
from lensforge.evaluate.metrics import classification_metrics, confident_mistakes
from lensforge.utils.io import atomic_write_bytes, atomic_write_json

SPLITS = ("train", "val", "test", "all")
Predictor = Callable[[np.ndarray], np.ndarray]  # uint8 (N, C, H, W) -> logits (N, K)


@dataclass
class EvalResult:
    """Metrics of one evaluation, and where they were written."""

    metrics: dict[str, Any]
    path: Path | None


@dataclass
class Target:
    """What is evaluated: its predictor, classes and preprocessing, and its run folder."""

    kind: str  # "run" or "bundle"
    predict: Predictor
    class_names: list[str]
    preprocess: Preprocess
    run_dir: Path | None
    data: str | None
    temperature: float = 1.0  # a calibrated bundle divides its logits by this before softmax


def open_target(path: Path, batch_size: int = 256, run_dir: str | Path | None = None) -> Target:
    """A run (PyTorch) or a bundle (ONNX Runtime), as something that predicts raw logits from uint8 images.

    ``run_dir`` names the run of a bundle kept outside it (a shipped variant): its data and splits are used.
    """
    from lensforge.artifacts import resolve_artifact
    from lensforge.deploy.bundle import load_bundle

    artifact = resolve_artifact(path, run_dir=run_dir)
    if artifact.is_bundle:
        bundle = load_bundle(path)
        return Target("bundle", lambda x: bundle.predict_uint8(x)[0], list(bundle.class_names),
                      bundle.preprocess, artifact.run_dir, artifact.run_info().get("data"), bundle.temperature)
    from lensforge.train.run import load_run

    run = load_run(path)
    return Target("run", _torch_predictor(run.model, run.preprocess, batch_size), run.class_names,
                  run.preprocess, path, run.info.get("data"))


def _torch_predictor(model: Any, pre: Preprocess, batch_size: int) -> Predictor:
    import torch

    from lensforge.models.normalize import Normalize

    normalize = Normalize(pre.mean, pre.std)

    @torch.no_grad()
    def predict(images: np.ndarray) -> np.ndarray:
        model.eval()
        return model(normalize(torch.from_numpy(images))).float().numpy()

    return predict


def select_split(table: ImageTable, target: Target, data_spec: str, split: str, seed: int = 0) -> np.ndarray:
    """Indices of ``split``: the run's own split when the data is the run's, else the data's own."""
    if split == "all":
        return np.arange(len(table))
    run_splits = target.run_dir / "splits.json" if target.run_dir else None
    if run_splits is not None and run_splits.exists() and data_spec == target.data:
        return load_splits(run_splits, table).get(split)
    if any(s is not None for s in table.fixed_splits):
        return make_splits(table, seed=seed).get(split)
    raise UsageError(f"data '{data_spec}' has no '{split}' split of its own and is not the run's data: "
                     "pass --split all, or a folder with train/val/test sub-folders")


def align_classes(table: ImageTable, class_names: list[str]) -> np.ndarray:
    """Targets re-indexed to the model's class order; unknown classes are an error."""
    if table.class_names == class_names:
        return table.targets
    unknown = sorted(set(table.class_names) - set(class_names))
    if unknown:
        raise DataError(f"data classes {unknown[:5]} are not among the model's classes {class_names[:10]}")
    mapping = np.array([class_names.index(name) for name in table.class_names])
    return mapping[table.targets]


def split_of(target: Target, data: str | None, split: str, *, on_bad_image: str = "fail",
             seed: int = 0) -> tuple[str, ImageTable, np.ndarray, np.ndarray]:
    """``(data spec, decoded table, indices of split, targets in the model's class order)``.

    ``data`` defaults to the run's own data, whose split is then the run's own.
    """
    data_spec = data or target.data
    if data_spec is None:
        raise UsageError("the bundle is outside a run: pass --data to say which images to use")
    source = open_source(data_spec)
    table = load_table(source, target.preprocess, on_bad_image=on_bad_image)
    indices = select_split(table, target, source.spec, split, seed)
    if len(indices) == 0:
        raise DataError(f"split '{split}' of '{data_spec}' is empty")
    return data_spec, table, indices, align_classes(table, target.class_names)[indices]


def predict_table(predict: Predictor, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def evaluate(target_path: str | Path, data: str | None = None, *, split: str = "test", batch_size: int = 256,
             on_bad_image: str = "fail", seed: int = 0, write: bool = True, mistakes: int = 16,
             run_dir: str | Path | None = None) -> EvalResult:
    """Evaluate a run folder or bundle on ``split`` of ``data`` (default: the run's own data).

    The artifact's task decides the metrics (:meth:`lensforge.tasks.Task.torch`): a classifier's
    are below (:func:`evaluate_classifier`), a detector's in :mod:`lensforge.evaluate.detection_runner`.
    ``run_dir`` names the run of a bundle kept outside it (its data and splits are used).
    """
    from lensforge.artifacts import resolve_artifact
    from lensforge.tasks import get_task

    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    artifact = resolve_artifact(target_path, run_dir=run_dir)
    return get_task(artifact.task).torch().evaluate(artifact, data, split=split, batch_size=batch_size,
                                                    on_bad_image=on_bad_image, seed=seed, write=write,
                                                    mistakes=mistakes)


def evaluate_classifier(artifact: Any, data: str | None = None, *, split: str = "test", batch_size: int = 256,
                        on_bad_image: str = "fail", seed: int = 0, write: bool = True, mistakes: int = 16
                        ) -> EvalResult:
    """A classifier's metrics on ``split``.

    A calibrated bundle is scored on the probabilities it ships (its temperature applied), with
    ``ece_uncalibrated`` beside ``ece``; ``at_chance`` says whether it beats the majority class.
    """
    target = open_target(artifact.path, batch_size, run_dir=artifact.run_dir)
    data_spec, table, indices, targets = split_of(target, data, split, on_bad_image=on_bad_image, seed=seed)
    logits = predict_table(target.predict, table.images[indices], batch_size)
    metrics = {"split": split, "evaluated": target.kind, "data": data_spec,
               **shipped_metrics(logits, targets, target.class_names, target.temperature)}
    out = None
    if write and target.run_dir is not None:
        metrics["mistakes"] = _write_mistakes(target.run_dir, split, table, indices, logits, targets,
                                              target.class_names, mistakes)
        out = atomic_write_json(target.run_dir / "eval" / f"{split}.json", metrics)
    return EvalResult(metrics, out)


def shipped_metrics(logits: np.ndarray, targets: np.ndarray, class_names: list[str],
                    temperature: float = 1.0) -> dict[str, Any]:
    """Metrics of the probabilities that ship: softmax(logits / temperature) for a calibrated bundle.

    Accuracy does not depend on the temperature; ECE and NLL do, so a calibrated bundle also
    reports ``ece_uncalibrated`` (temperature 1) beside its shipped ``ece``.
    """
    metrics = classification_metrics(logits / temperature, targets, class_names)
    metrics["temperature"] = temperature
    if temperature != 1.0:
        metrics["ece_uncalibrated"] = classification_metrics(logits, targets, class_names)["ece"]
    return metrics


def _write_mistakes(run_dir: Path, split: str, table: ImageTable, indices: np.ndarray, logits: np.ndarray,
                    targets: np.ndarray, class_names: list[str], limit: int) -> list[dict[str, Any]]:
    import io

    folder = run_dir / "eval" / "mistakes"
    for old in folder.glob(f"{split}_*.png"):
        old.unlink()
    rows = []
    for rank, (i, predicted, confidence) in enumerate(confident_mistakes(logits, targets, limit)):
        buffer = io.BytesIO()
        array_to_image(table.images[indices[i]]).save(buffer, format="PNG")
        name = f"{split}_{rank:03d}.png"
        atomic_write_bytes(folder / name, buffer.getvalue())
        rows.append({"origin": table.origins[indices[i]], "true": class_names[int(targets[i])],
                     "pred": class_names[predicted], "confidence": confidence,
                     "image": f"eval/mistakes/{name}"})
    return rows


# older private names, kept for code written against them
_open_target, _select, _align_classes = open_target, select_split, align_classes
