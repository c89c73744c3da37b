"""Classify image files with a bundle (no torch: Pillow, NumPy and ONNX Runtime only).

Files are decoded safely, resized exactly as in training, batched, and turned into
calibrated probabilities (softmax of logits / temperature). Rows come back in the
order of the input files, errors included. A bundle with guardrails (see
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
from lensforge.tasks.classification import classification_row

PathLike = str | os.PathLike[str]
ON_BAD_IMAGE = ("fail", "skip")
Pending = list[tuple[Path, np.ndarray, tuple[int, int]]]  # path, model input, decoded (width, height)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (stable for large logits)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def predict_files(
    bundle: Bundle | PathLike,
    paths: PathLike | Iterable[PathLike],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    on_bad_image: str = "fail",
) -> Iterator[dict[str, Any]]:
    """Yield one prediction row per image file, in input order.

    Rows are ``{"path", "label", "class_index", "confidence", "top_k": [{"label", "prob"}]}``;
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
            yield from _classify(bundle, pending, top_k, guardrails)
            pending = []
            yield {"path": str(path), "error": str(e)}
            continue
        pending.append((path, pixels, image.size))
        if len(pending) == batch_size:
            yield from _classify(bundle, pending, top_k, guardrails)
            pending = []
    yield from _classify(bundle, pending, top_k, guardrails)


def _classify(
    bundle: Bundle, items: Pending, top_k: int, guardrails: Guardrails | None
) -> Iterator[dict[str, Any]]:
    if not items:
        return
    batch = np.stack([pixels for _, pixels, _ in items])
    logits, features = bundle.predict_uint8(batch)
    probs = softmax(logits, bundle.temperature)
    rows = [_row(bundle, path, row_probs, top_k) for (path, _, _), row_probs in zip(items, probs)]
    if guardrails is not None:
        checks = guardrails.check(logits, features, batch, [size for _, _, size in items])
        for row, check in zip(rows, checks):
            row.update(check)
    yield from rows


def _row(bundle: Bundle, path: Path, probs: np.ndarray, top_k: int) -> dict[str, Any]:
    return {"path": str(path), **classification_row(probs, bundle.class_names, top_k)}
