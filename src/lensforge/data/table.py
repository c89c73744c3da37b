"""Decode a source once into an in-memory uint8 image table sized for the model.

Small data sets (the common case for our users) are decoded, converted and
resized a single time, then held as one (N, C, H, W) uint8 array; training then
normalises and augments whole batches with tensor ops, which is what keeps a
2-core CPU busy with the model instead of with JPEG decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from lensforge.data.preprocess import Preprocess, resize_to_input
from lensforge.data.sources import SampleRecord, Source, is_image_name
from lensforge.errors import DataError, UsageError
from lensforge.tasks import get_task

BAD_IMAGE_POLICIES = ("fail", "skip")


@dataclass
class ImageTable:
    """Decoded samples: images (N, C, H, W) uint8, targets, origins and fixed splits."""

    images: np.ndarray
    targets: np.ndarray
    origins: list[str]
    fixed_splits: list[str | None]
    class_names: list[str]
    task: str
    preprocess: Preprocess
    skipped: list[dict[str, str]] = field(default_factory=list)
    sizes: np.ndarray | None = None  # (N, 2) int: each decoded image's (width, height) before resizing

    def __len__(self) -> int:
        return len(self.origins)

    def subset(self, indices: np.ndarray) -> ImageTable:
        return ImageTable(self.images[indices], self.targets[indices],
                          [self.origins[i] for i in indices],
                          [self.fixed_splits[i] for i in indices],
                          self.class_names, self.task, self.preprocess,
                          sizes=None if self.sizes is None else self.sizes[indices])


def _decode_one(source: Source, record: SampleRecord, pre: Preprocess) -> tuple[np.ndarray, tuple[int, int]]:
    """The record's model-input pixels and its decoded (width, height)."""
    if source.arrays is None and not is_image_name(record.origin):
        suffix = os.path.splitext(record.origin)[1] or "no suffix"
        raise DataError(f"{record.origin}: not an image file ({suffix})")
    image = source.load(record, pre.mode)
    return resize_to_input(image, pre), image.size


# Decoded tables kept for the next call with the same source, preprocessing and file states:
# autopilot's steps after training (evaluate, calibrate, guardrails, stress) each open the
# data again, and decoding a 60,000-image folder takes ~25 s every time on 2 cores.
_CACHE_ENTRIES = 2
_cache: OrderedDict[str, ImageTable] = OrderedDict()


def load_table(
    source: Source,
    pre: Preprocess,
    *,
    on_bad_image: str = "fail",
    progress: Callable[[int], None] | None = None,
    cache: bool = True,
) -> ImageTable:
    """Decode every record of ``source`` with ``pre``; bad images fail or are skipped and listed.

    With ``cache``, the last tables decoded in this process are reused when the source spec,
    the preprocessing and every file's size and modification time are unchanged (a changed
    file decodes again). Callers must not write into the returned arrays.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise UsageError(f"--on-bad-image must be one of {', '.join(BAD_IMAGE_POLICIES)}, not {on_bad_image!r}")
    key = _cache_key(source, pre, on_bad_image) if cache else None
    if key is not None and key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    table = _decode_table(source, pre, on_bad_image, progress)
    if key is not None:
        _cache[key] = table
        while len(_cache) > _CACHE_ENTRIES:
            _cache.popitem(last=False)
    return table


def _cache_key(source: Source, pre: Preprocess, on_bad_image: str) -> str | None:
    """What decides a decoded table: spec, preprocessing, policy, and each file's size and mtime."""
    digest = hashlib.sha256(json.dumps([source.spec, pre.to_dict(), on_bad_image], sort_keys=True,
                                       default=str).encode())
    if source.arrays is not None:  # built-in sources are generated from their spec
        digest.update(repr((source.arrays.shape, len(source.records))).encode())
        return digest.hexdigest()
    for record in source.records:
        try:
            stat = os.stat(record.origin)
        except OSError:
            return None  # a file that cannot be read is reported by decoding, never cached
        digest.update(f"{record.origin}\0{stat.st_size}\0{stat.st_mtime_ns}\0{record.target}\0{record.split}\n"
                      .encode())
    return digest.hexdigest()


def _decode_table(source: Source, pre: Preprocess, on_bad_image: str,
                  progress: Callable[[int], None] | None) -> ImageTable:
    task = get_task(source.task)
    records = source.records
    images: list[tuple[np.ndarray, tuple[int, int]] | None] = [None] * len(records)
    skipped: list[dict[str, str]] = []

    def work(i: int) -> tuple[int, tuple[np.ndarray, tuple[int, int]] | None, str | None]:
        try:
            return i, _decode_one(source, records[i], pre), None
        except DataError as e:
            return i, None, str(e)

    workers = 1 if source.arrays is not None else min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, image, error in pool.map(work, range(len(records)), chunksize=64):
            if error is not None:
                if on_bad_image == "fail":
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise DataError(f"{error} (use --on-bad-image skip to skip bad files)")
                skipped.append({"origin": records[i].origin, "reason": error})
            images[i] = image
            if progress is not None:
                progress(1)
    keep = [i for i, image in enumerate(images) if image is not None]
    if not keep:
        raise DataError(f"no readable images in '{source.spec}' ({len(skipped)} bad files skipped)")
    stacked = np.stack([images[i][0] for i in keep])
    sizes = np.array([images[i][1] for i in keep], dtype=np.int64)
    return ImageTable(
        images=stacked,
        targets=task.collate([task.to_input_target(records[i].target, tuple(sizes[n]), pre)
                              for n, i in enumerate(keep)]),
        origins=[records[i].origin for i in keep],
        fixed_splits=[records[i].split for i in keep],
        class_names=list(source.class_names),
        task=source.task,
        preprocess=pre,
        skipped=skipped,
        sizes=sizes,
    )
