"""The registry of data sources.

A source lists :class:`SampleRecord` s (target, origin, optional fixed split) and
decodes one record at a time into a Pillow image. Specs are strings so that the
CLI and config files can name them:

- ``builtin:digits`` — scikit-learn's 1,797 real 8x8 handwritten digits;
- ``builtin:shapes?n=5000&size=32&domain=shifted&noise=0.1`` — procedural shapes;
- a folder in ImageFolder layout, optionally split into ``train/ val/ test/``;
- a ``.csv`` or ``.jsonl`` manifest with ``path,label[,split]``;
- detection data (``task="detection"``): COCO, YOLO, Pascal VOC, Label Studio or a box CSV,
  found from the path by :func:`lensforge.data.detection.detect_format`;
- ``builtin:shapes?task=detect`` — several shapes per image with boxes.
"""

from __future__ import annotations

import csv
import json
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lensforge.data.decode import IMAGE_SUFFIXES, decode_image
from lensforge.errors import DataError, UsageError
from lensforge.registry import Registry

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class SampleRecord:
    """One sample: its target, where it came from, and its split if the source fixes one."""

    target: Any
    origin: str
    split: str | None = None
    index: int = -1  # position in an in-memory builtin array


@dataclass
class Source:
    """A data source: records plus a way to decode each one.

    Attributes:
        spec: the string that recreates this source (written into runs).
        task: task name from :mod:`lensforge.tasks`.
        class_names: names of the targets' classes, index order.
        records: every sample, in a stable order.
        color_mode: "RGB" or "L", the natural colour mode of the data.
        arrays: for built-in sources, the images as uint8 (N, H, W[, C]).
        annotations: optional per-sample extras (boxes, masks) for later tasks.
        problems: labels left out under ``on_bad_label="skip"`` (and unannotated tasks), as
            ``{"origin", "reason"}`` with a one-line reason naming the file and line or id.
    """

    spec: str
    task: str
    class_names: list[str]
    records: list[SampleRecord]
    color_mode: str = "RGB"
    arrays: np.ndarray | None = None
    annotations: dict[str, np.ndarray] = field(default_factory=dict)
    flip_invariant: bool = True  # False where a mirrored image changes class (digits, text)
    problems: list[dict[str, str]] = field(default_factory=list)

    def load(self, record: SampleRecord, mode: str) -> Image.Image:
        """Decode one record as a ``mode`` image; raises DataError for a bad file."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[record.index]).convert(mode)
        return decode_image(record.origin, mode=mode)

    @property
    def native_size(self) -> tuple[int, int] | None:
        """(height, width) of in-memory sources; None for files of unknown size."""
        if self.arrays is None:
            return None
        return int(self.arrays.shape[1]), int(self.arrays.shape[2])


SourceFactory = Callable[..., Source]
SOURCES: Registry[SourceFactory] = Registry("source")


def list_sources(pattern: str = "*") -> list[str]:
    return SOURCES.list(pattern)


def open_source(spec: str | Path, **options: Any) -> Source:
    """Open a source from a spec string (see module doc); ``options`` override query options.

    ``on_bad_label`` ("fail" or "skip") applies to detection data and is ignored by the others.
    """
    from lensforge.data.detection import check_policy, detect_format

    text = str(spec).strip()
    if not text:
        raise UsageError("--data is empty: give builtin:digits, builtin:shapes, a folder or a CSV/JSONL file")
    on_bad_label = check_policy(options.pop("on_bad_label", "fail"))
    if text.startswith("builtin:"):
        name, _, query = text.partition("?")
        params: dict[str, Any] = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        params.update(options)
        if name not in SOURCES:
            raise UsageError(SOURCES.unknown_message(name))
        return SOURCES.get(name)(**params)
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"data path '{path}' does not exist")
    detection_format = detect_format(path)
    if detection_format is not None:
        return SOURCES.get(detection_format)(path=path, on_bad_label=on_bad_label, **options)
    if path.is_dir():
        return SOURCES.get("folder")(root=path, **options)
    if path.suffix.lower() in (".csv", ".jsonl"):
        return SOURCES.get("manifest")(path=path, **options)
    raise DataError(f"data path '{path}' is neither a folder, a .csv/.jsonl manifest nor a COCO/Label Studio .json")


def _int_option(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    raw = params.pop(key, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise UsageError(f"data option {key}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise UsageError(f"data option {key}={value} is out of range [{low}, {high}]")
    return value


def _reject_unknown(params: dict[str, Any], source: str) -> None:
    if params:
        raise UsageError(f"unknown option(s) for {source}: {', '.join(sorted(params))}")


@SOURCES.register("builtin:digits")
def digits_source(**params: Any) -> Source:
    """scikit-learn's 8x8 handwritten digits (16 grey levels, scaled to 0..255)."""
    from sklearn.datasets import load_digits

    _reject_unknown(params, "builtin:digits")
    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    records = [SampleRecord(int(t), f"builtin:digits#{i}", None, i) for i, t in enumerate(bunch.target)]
    names = [str(d) for d in range(10)]
    return Source("builtin:digits", "classification", names, records, "L", images, flip_invariant=False)


@SOURCES.register("builtin:shapes")
def shapes_source(**params: Any) -> Source:
    """Procedural shapes; options task (classify, or detect: several per image with boxes), n, size,
    seed, domain (preset) and any ShapesDomain field."""
    from lensforge.data.shapes import ShapesDomain, generate_shapes

    params = dict(params)
    task = str(params.pop("task", "classify"))
    if task not in ("classify", "classification", "detect", "detection"):
        raise UsageError(f"data option task={task!r} must be classify or detect")
    detect = task.startswith("detect")
    n = _int_option(params, "n", 3000, 1, 5_000_000)
    size = _int_option(params, "size", 128 if detect else 32, 8, 1024)
    seed = _int_option(params, "seed", 0, 0, 2**31 - 1)
    domain = ShapesDomain.preset(str(params.pop("domain", "source")))
    overrides: dict[str, Any] = {}
    for key in list(params):
        if key in ShapesDomain.__dataclass_fields__:
            raw = params.pop(key)
            try:
                values = [float(v) for v in str(raw).split(",")] if isinstance(raw, str) else raw
            except ValueError:
                raise UsageError(f"data option {key}={raw!r} must be a number (or numbers, comma-separated)") from None
            overrides[key] = (tuple(values) if len(values) > 1 else values[0]) if isinstance(values, list) else values
    _reject_unknown(params, "builtin:shapes")
    if overrides:
        domain = ShapesDomain(**{**domain.__dict__, **overrides})
    if detect:
        from lensforge.data.shapes_detect import shapes_detect_source

        return shapes_detect_source(n, size=size, seed=seed, domain=domain)
    data = generate_shapes(n, size=size, seed=seed, domain=domain)
    domain_fields = {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in domain.__dict__.items()}
    query = urllib.parse.urlencode({"n": n, "size": size, "seed": seed, **domain_fields}, safe=",")
    records = [SampleRecord(int(t), f"builtin:shapes#{i}", None, i) for i, t in enumerate(data.labels)]
    annotations = {"boxes": data.boxes}
    return Source(f"builtin:shapes?{query}", "classification", list(data.class_names), records,
                  "RGB", data.images, annotations)


def _is_candidate(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".")


@SOURCES.register("folder")
def folder_source(root: str | Path, **params: Any) -> Source:
    """ImageFolder layout: ``root/<class>/*`` or ``root/<split>/<class>/*``."""
    _reject_unknown(params, "a folder source")
    root = Path(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in subdirs if p.name.lower() in _SPLIT_ALIASES]
    if split_dirs and len(split_dirs) == len(subdirs):
        layout = [(d, _SPLIT_ALIASES[d.name.lower()]) for d in split_dirs]
    else:
        layout = [(root, None)]
    class_names = sorted({c.name for base, _ in layout for c in base.iterdir()
                          if c.is_dir() and not c.name.startswith(".")})
    if not class_names:
        raise DataError(f"data folder '{root}' has no class sub-folders (expected root/<class>/*.png)")
    index = {name: i for i, name in enumerate(class_names)}
    records = []
    for base, split in layout:
        for class_dir in sorted(c for c in base.iterdir() if c.name in index and c.is_dir()):
            for f in sorted(class_dir.rglob("*")):
                if _is_candidate(f):
                    records.append(SampleRecord(index[class_dir.name], str(f), split))
    if not records:
        raise DataError(f"data folder '{root}' contains no files in its class folders")
    return Source(str(root), "classification", class_names, records)


def _read_manifest_rows(path: Path) -> list[dict[str, str]]:
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
                columns = {c.strip().lower() for c in (reader.fieldnames or [])}
        else:
            rows, columns = [], set()
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{n}: each JSONL line must be an object")
                    rows.append({str(k).lower(): str(v) for k, v in row.items()})
                    columns |= set(rows[-1])
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"manifest '{path}' cannot be parsed: {e}") from None
    missing = {"path", "label"} - columns
    if missing:
        raise DataError(f"manifest '{path}' lacks column(s) {', '.join(sorted(missing))} "
                        "(needs path,label and optionally split)")
    if not rows:
        raise DataError(f"manifest '{path}' has no rows")
    return rows


@SOURCES.register("manifest")
def manifest_source(path: str | Path, **params: Any) -> Source:
    """CSV or JSONL manifest: ``path,label[,split]``; paths relative to the manifest's folder."""
    _reject_unknown(params, "a manifest source")
    path = Path(path)
    rows = _read_manifest_rows(path)
    class_names = sorted({r["label"] for r in rows})
    index = {name: i for i, name in enumerate(class_names)}
    records = []
    for line, row in enumerate(rows, 2 if path.suffix.lower() == ".csv" else 1):
        if not row["path"] or not row["label"]:
            raise DataError(f"{path}:{line}: empty path or label")
        split = row.get("split") or None
        if split is not None:
            if split.lower() not in _SPLIT_ALIASES:
                raise DataError(f"{path}:{line}: unknown split {split!r} (use train, val or test)")
            split = _SPLIT_ALIASES[split.lower()]
        file = Path(row["path"]).expanduser()
        file = file if file.is_absolute() else path.parent / file
        records.append(SampleRecord(index[row["label"]], str(file), split))
    return Source(str(path), "classification", class_names, records)


def task_of(spec: str | Path) -> str:
    """The task of the data at ``spec`` without opening it (no decoding, no generation)."""
    text = str(spec).strip()
    if text.startswith("builtin:"):
        query = dict(urllib.parse.parse_qsl(text.partition("?")[2]))
        return "detection" if str(query.get("task", "")).startswith("detect") else "classification"
    from lensforge.data.detection.layout import detect_format

    path = Path(text).expanduser()
    try:
        return "detection" if path.exists() and detect_format(path) else "classification"
    except DataError:
        return "detection"  # a detection layout with a problem: opening it says what


def is_image_name(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


# Detection sources register themselves in SOURCES; imported last, as they build on the names above.
from lensforge.data import detection as _detection  # noqa: E402, F401
