"""Which detection format a path holds, the split layout, and the registered sources.

A file: ``.json`` holding an object is COCO, holding a list is a Label Studio export;
``.csv`` with ``xmin,ymin,xmax,ymax`` columns is a box CSV (``path,label`` stays the
classification manifest); ``data.yaml`` is its YOLO folder. A folder, checked in this
order: a COCO file by name (``annotations.json``, ``_annotations.coco.json``,
``instances*.json``, also under ``annotations/``); YOLO (``images/`` with ``labels/`` or
a ``data.yaml``; or a names file and images with their ``.txt`` beside them); Pascal VOC
(``Annotations/`` or ``*.xml``); a single JSON list (Label Studio); a single box CSV. A
folder whose sub-folders are all split names (``train``, ``val``/``valid``, ``test``) is
read split by split, each in one format. Anything else is not detection data: None, and
the caller opens it as a classification folder or manifest exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lensforge.data.decode import IMAGE_SUFFIXES
from lensforge.data.detection.coco import read_coco
from lensforge.data.detection.common import LabelIssues, ReadPart, build_source
from lensforge.data.detection.csv_boxes import is_box_csv, read_box_csv
from lensforge.data.detection.labelstudio import read_labelstudio
from lensforge.data.detection.voc import read_voc, voc_files
from lensforge.data.detection.yolo import TEXT_NAMES, YAML_NAMES, read_yolo
from lensforge.data.sources import SOURCES, Source
from lensforge.errors import DataError, UsageError

Reader = Callable[[Path, "str | None", LabelIssues, "Path | None"], ReadPart]
READERS: dict[str, Reader] = {"coco": read_coco, "yolo": read_yolo, "voc": read_voc,
                              "labelstudio": read_labelstudio, "box-csv": read_box_csv}
FORMATS = tuple(READERS)
COCO_FILE_NAMES = ("annotations.json", "_annotations.coco.json")
_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
           "test": "test", "testing": "test"}


def split_parts(root: Path) -> list[tuple[Path, str]] | None:
    """``[(folder, split)]`` when every sub-folder of ``root`` is a split name, else None."""
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    parts = [(p, _SPLITS[p.name.lower()]) for p in subdirs if p.name.lower() in _SPLITS]
    if not parts or len(parts) != len(subdirs):
        return None
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(parts, key=lambda part: (order[part[1]], part[0].name))


def _json_kind(path: Path) -> str | None:
    try:
        with path.open(encoding="utf-8-sig") as f:
            head = f.read(4096).lstrip()
    except (OSError, UnicodeDecodeError):
        return None
    return {"{": "coco", "[": "labelstudio"}.get(head[:1])


def _coco_file(folder: Path) -> Path | None:
    found = []
    for base in (folder, folder / "annotations"):
        if base.is_dir():
            found += [p for p in sorted(base.glob("*.json"))
                      if p.name in COCO_FILE_NAMES or p.name.startswith("instances")]
    if len(found) > 1:
        raise DataError(f"{folder}: several COCO files ({', '.join(p.name for p in found)}); "
                        "open one of them, or put each split in train/, val/, test/ folders")
    return found[0] if found else None


def _is_yolo(folder: Path) -> bool:
    """images/ + labels/, or a names file with images/ or with labels beside the images (darknet)."""
    if (folder / "images").is_dir() and ((folder / "labels").is_dir()
                                         or any((folder / name).is_file() for name in YAML_NAMES)):
        return True
    if not any((folder / name).is_file() for name in YAML_NAMES + TEXT_NAMES):
        return False
    # a classification folder may hold a classes.txt and notes: darknet needs an image with its .txt
    # (anywhere below: CVAT puts them in obj_train_data/ beside obj.names)
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file() for p in folder.rglob("*"))


def _single(folder: Path, suffix: str, check: Callable[[Path], bool]) -> Path | None:
    found = [p for p in sorted(folder.glob(f"*{suffix}")) if not p.name.startswith(".") and check(p)]
    return found[0] if len(found) == 1 else None


def folder_format(folder: Path) -> tuple[str, Path] | None:
    """(format, what its reader reads) for one folder without splits; None when it is not detection data."""
    coco = _coco_file(folder)
    if coco is not None:
        return "coco", coco
    if _is_yolo(folder):
        return "yolo", folder
    if (folder / "Annotations").is_dir() or voc_files(folder):
        return "voc", folder
    export = _single(folder, ".json", lambda p: _json_kind(p) == "labelstudio")
    if export is not None:
        return "labelstudio", export
    table = _single(folder, ".csv", is_box_csv)
    return ("box-csv", table) if table is not None else None


def file_format(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".json":
        kind = _json_kind(path)
        if kind is None:
            raise DataError(f"{path}: neither a COCO file (an object) nor a Label Studio export (a list)")
        return kind
    if suffix == ".csv":
        return "box-csv" if is_box_csv(path) else None
    if suffix in (".yaml", ".yml"):
        return "yolo"
    return None


def detect_format(path: Path) -> str | None:
    """The detection format at ``path`` (one of :data:`FORMATS`); None for classification data."""
    if path.is_file():
        return file_format(path)
    parts = split_parts(path)
    if parts is None:
        found = folder_format(path)
        return found[0] if found else None
    formats = {folder.name: (folder_format(folder) or ("none",))[0] for folder, _ in parts}
    kinds = set(formats.values())
    if kinds == {"none"}:
        return None
    if len(kinds) > 1:
        listed = ", ".join(f"{name}: {kind}" for name, kind in formats.items())
        raise DataError(f"{path}: the split folders use different formats ({listed}); give them one format")
    return kinds.pop()


def _parts(path: Path, fmt: str) -> list[tuple[Path, str | None]]:
    if path.is_file():
        return [(path, None)]
    layout = split_parts(path) or [(path, None)]
    parts = []
    for folder, split in layout:
        found = folder_format(folder)
        if found is None or found[0] != fmt:
            raise DataError(f"{folder}: not a {fmt} folder ({'found ' + found[0] if found else 'no annotations'})")
        parts.append((found[1], split))
    return parts


def open_detection(path: str | Path, fmt: str, on_bad_label: str = "fail") -> Source:
    """Read detection data in format ``fmt`` from a file, a folder, or train/val/test folders."""
    path = Path(path).expanduser()
    if fmt not in READERS:
        raise UsageError(f"unknown detection format {fmt!r} (known: {', '.join(FORMATS)})")
    if not path.exists():
        raise DataError(f"data path '{path}' does not exist")
    issues = LabelIssues(on_bad_label)
    root = path.parent if path.is_file() else path
    read = [READERS[fmt](part, split, issues, root) for part, split in _parts(path, fmt)]
    return build_source(str(path), read, issues)


def _register(fmt: str) -> None:
    def open_format(path: str | Path, *, on_bad_label: str = "fail", **params: Any) -> Source:
        if params:
            raise UsageError(f"unknown option(s) for a {fmt} source: {', '.join(sorted(params))}")
        return open_detection(path, fmt, on_bad_label)

    open_format.__doc__ = f"Detection data in {fmt} format (see lensforge.data.detection.layout)."
    SOURCES.register(fmt)(open_format)


for _fmt in FORMATS:
    _register(_fmt)
