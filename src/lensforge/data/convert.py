"""Convert object-detection data between label formats (``lensforge data convert SRC --to FMT OUT``).

Reading goes through :func:`lensforge.data.open_source`, so every format, split layout and
check of :mod:`lensforge.data.detection` applies; writing through
:mod:`lensforge.data.detection.writers`. Boxes travel on the decoded pixels (EXIF
applied) and each writer puts them in its format's frame, so a round trip through any
formats keeps every box within a pixel (VOC rounds to whole pixels).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from lensforge.data.detection.common import ImageInfo, probe_image
from lensforge.data.detection.writers import LABEL_WRITERS, ExportImage, yolo_data_yaml
from lensforge.data.sources import Source, open_source
from lensforge.errors import DataError, UsageError
from lensforge.utils.io import atomic_write_text

SPLIT_ORDER = ("train", "val", "test")


def convert_boxes(src: str | Path, to: str, out: str | Path, *, on_bad_label: str = "fail") -> dict[str, Any]:
    """Write the detection data ``src`` in format ``to`` into the new folder ``out``.

    Args:
        src: anything :func:`~lensforge.data.open_source` reads as detection data: a COCO or
            Label Studio JSON, a YOLO or Pascal VOC folder, a box CSV, a folder of
            ``train/ val/ test/`` splits in one of those, or ``builtin:shapes?task=detect``.
        to: ``coco`` (``annotations.json`` + ``images/``), ``yolo`` (``data.yaml``,
            ``images/``, ``labels/``), ``voc`` (``Annotations/``, ``JPEGImages/``) or
            ``labelstudio`` (``tasks.json`` + ``images/``, images as
            ``/data/local-files/?d=PATH`` relative to ``out``).
        out: a folder that does not exist yet or is empty. It receives a copy of every image
            (built-in images as PNG), so it stands on its own; data with fixed splits gets a
            ``train/``, ``val/``, ``test/`` sub-folder per split (YOLO's ``data.yaml`` at the top).
        on_bad_label: "fail" (a bad label raises) or "skip" (it is left out and listed in ``problems``).

    The source is only read. Everything is written into a hidden folder beside ``out`` and
    renamed to ``out`` when complete, so ``out`` never holds half a conversion.

    Returns:
        ``format``, ``out``, ``images``, ``boxes``, ``negatives`` (images without boxes),
        ``classes``, ``splits`` (images per split; ``{}`` without fixed splits), ``skipped``
        and ``problems`` (what ``on_bad_label="skip"`` left out: ``{"origin", "reason"}``).

    Raises:
        UsageError: an unknown format, ``out`` not empty, or ``src`` not detection data.
        DataError: bad labels under "fail", or data that cannot be read.
    """
    if to not in LABEL_WRITERS:
        raise UsageError(LABEL_WRITERS.unknown_message(to))
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output folder '{out}' is not empty: give a new or empty folder")
    source = open_source(src, on_bad_label=on_bad_label)
    if source.task != "detection":
        raise UsageError(f"'{src}' is {source.task} data: only detection data (boxes) can be converted")
    groups = _groups(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for split, images in groups.items():
            LABEL_WRITERS.get(to)(staging / split if split else staging, images, source.class_names, split)
        if to == "yolo":
            atomic_write_text(staging / "data.yaml", yolo_data_yaml(source.class_names, [s for s in groups if s]))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _counts(to, out, source, groups)


def _groups(source: Source) -> dict[str, list[ExportImage]]:
    """Images per split ("" when the data has no fixed splits), in split order, named for the output."""
    splits = {record.split for record in source.records}
    if None in splits and len(splits) > 1:
        raise DataError(f"'{source.spec}': some images have a split and others do not")
    infos = _infos(source)
    groups: dict[str, list[ExportImage]] = {}
    for split in sorted(splits, key=lambda s: SPLIT_ORDER.index(s) if s else -1):
        indices = [i for i, record in enumerate(source.records) if record.split == split]
        names = _names(source, indices)
        groups[split or ""] = [_export_image(source, i, name, infos[i]) for i, name in zip(indices, names)]
    return groups


def _infos(source: Source) -> list[ImageInfo]:
    if source.arrays is not None:
        height, width = source.arrays.shape[1:3]
        return [ImageInfo((width, height))] * len(source.records)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        infos = list(pool.map(probe_image, [Path(r.origin) for r in source.records]))
    for info in infos:
        if isinstance(info, str):
            raise DataError(info)
    return infos  # type: ignore[return-value]


def _names(source: Source, indices: list[int]) -> list[str]:
    """Output names: paths below the images' common folder, made unique by stem (labels are named by stem)."""
    if source.arrays is not None:
        return [f"{source.records[i].index:06d}.png" for i in indices]
    paths = [Path(os.path.abspath(source.records[i].origin)) for i in indices]
    base = Path(os.path.commonpath([p.parent for p in paths]))
    names, used = [], set()
    for path in paths:
        name = PurePosixPath(path.relative_to(base).as_posix())
        stem, number = name.stem, 2
        while (name.parent, name.stem.lower()) in used:
            name = name.with_name(f"{stem}_{number}{name.suffix}")
            number += 1
        used.add((name.parent, name.stem.lower()))
        names.append(str(name))
    return names


def _export_image(source: Source, i: int, name: str, info: ImageInfo) -> ExportImage:
    record = source.records[i]
    target = record.target
    if source.arrays is not None:
        return ExportImage(name, info, target.boxes, target.labels, pixels=source.arrays[record.index])
    return ExportImage(name, info, target.boxes, target.labels, source=Path(record.origin))


def _counts(to: str, out: Path, source: Source, groups: dict[str, list[ExportImage]]) -> dict[str, Any]:
    images = [image for group in groups.values() for image in group]
    per_split = Counter({split: len(group) for split, group in groups.items() if split})
    return {"format": to, "out": str(out), "images": len(images), "boxes": sum(len(i.labels) for i in images),
            "negatives": sum(len(i.labels) == 0 for i in images), "classes": len(source.class_names),
            "splits": dict(per_split), "skipped": len(source.problems), "problems": list(source.problems)}
