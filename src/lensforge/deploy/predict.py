"""Predict image files with a bundle (no torch: Pillow, NumPy and ONNX Runtime only).

Files are decoded safely, resized exactly as in training, batched, and turned into the
bundle's task's rows (:meth:`lensforge.tasks.Task.predict_batch`): calibrated class
probabilities (softmax of logits / temperature) for a classifier, boxes in original
pixels for a detector. Rows come back in the order of the input files, errors included. A bundle with guardrails (see
:mod:`lensforge.deploy.guardrails`) also flags each image: out-of-distribution,
failed input-quality checks, and whether to abstain.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.data.decode import decode_image, find_images
from lensforge.data.preprocess import resize_to_input
from lensforge.deploy.bundle import Bundle, load_bundle
from lensforge.deploy.guardrails import Guardrails, guardrails_for
from lensforge.errors import DataError, UsageError
from lensforge.tasks import get_task

PathLike = str | os.PathLike[str]
ON_BAD_IMAGE = ("fail", "skip")
Pending = list[tuple[Path, np.ndarray, tuple[int, int]]]  # path, model input, decoded (width, height)


def predict_files(
    bundle: Bundle | PathLike,
    paths: PathLike | Iterable[PathLike],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    on_bad_image: str = "fail",
) -> Iterator[dict[str, Any]]:
    """Yield one prediction row per image file, in input order.

    A classifier's rows are ``{"path", "label", "class_index", "confidence", "top_k": [{"label", "prob"}]}``,
    a detector's ``{"path", "detections": [{"label", "class_index", "score", "box": [x1, y1, x2, y2]}],
    "count"}`` (boxes in the original image's pixels);
    with ``on_bad_image="skip"`` an unreadable image gives ``{"path", "error"}`` instead.
    When the bundle has guardrails, rows also carry ``"ood"`` (bool), ``"ood_score"``
    (higher = more out-of-distribution), ``"quality"`` (failed check codes, e.g.
    ``["too_dark"]``) and ``"abstain"`` (out of distribution, a failed quality check, or confidence
    below the fitted threshold: the server's rule, see :meth:`Guardrails.check`).
    Paths are checked before the first row, so a missing path raises at the call.

    Raises:
        DataError: a missing path, or a bad image with ``on_bad_image="fail"``.
        ArtifactError: the bundle's guardrails are damaged.
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise UsageError(f"on_bad_image must be one of {ON_BAD_IMAGE}, not {on_bad_image!r}")
    if top_k < 1 or batch_size < 1:
        raise UsageError(f"top_k and batch_size must be >= 1 (got {top_k}, {batch_size})")
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    files = find_images(paths)
    guardrails = guardrails_for(bundle)  # read once per bundle; a damaged file raises here
    return _predict_rows(
        bundle, files, guardrails, top_k=top_k, batch_size=batch_size, skip=on_bad_image == "skip"
    )


def _predict_rows(
    bundle: Bundle,
    files: list[Path],
    guardrails: Guardrails | None,
    *,
    top_k: int,
    batch_size: int,
    skip: bool,
) -> Iterator[dict[str, Any]]:
    pending: Pending = []
    for path in files:
        try:
            image = decode_image(path, mode=bundle.preprocess.mode)
            pixels = resize_to_input(image, bundle.preprocess)
        except DataError as e:
            if not skip:
                raise
            # flush first so rows stay in input order
            yield from _predict_batch(bundle, pending, top_k, guardrails)
            pending = []
            yield {"path": str(path), "error": str(e)}
            continue
        pending.append((path, pixels, image.size))
        if len(pending) == batch_size:
            yield from _predict_batch(bundle, pending, top_k, guardrails)
            pending = []
    yield from _predict_batch(bundle, pending, top_k, guardrails)


def _predict_batch(
    bundle: Bundle, items: Pending, top_k: int, guardrails: Guardrails | None
) -> Iterator[dict[str, Any]]:
    if not items:
        return
    batch = np.stack([pixels for _, pixels, _ in items])
    rows = get_task(bundle.task).predict_batch(bundle, batch, [size for _, _, size in items],
                                               guardrails=guardrails, top_k=top_k)
    for (path, _, _), row in zip(items, rows):
        yield {"path": str(path), **row}
