"""Box CSV: ``path,xmin,ymin,xmax,ymax,label`` rows, one per box, optionally ``split``, ``width,height``.

Told apart from the classification manifest (``path,label``) by its box columns.
``filename`` and ``class`` are accepted for ``path`` and ``label`` (TensorFlow Object
Detection CSVs). A row with empty box fields makes its image a negative. Paths are
relative to the CSV's folder. Boxes are on the stored pixels (these CSVs usually come
from LabelImg's VOC files) unless ``width,height`` match only the rotated image.
Class names: the sorted labels found.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lensforge.data.detection.common import ImageEntry, LabelIssues, ReadPart
from lensforge.errors import DataError

BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")
_ALIASES = {"filename": "path", "file": "path", "image": "path", "class": "label", "name": "label"}
_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
           "test": "test", "testing": "test"}


def csv_columns(path: Path) -> set[str]:
    """The header's column names (lower case, aliases resolved); empty when it cannot be read."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()
    return {_ALIASES.get(c.strip().lower(), c.strip().lower()) for c in header}


def is_box_csv(path: Path) -> bool:
    return set(BOX_COLUMNS) <= csv_columns(path)


def _rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [{_ALIASES.get((k or "").strip().lower(), (k or "").strip().lower()): (v or "").strip()
                     for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot be read as CSV ({e})") from None
    missing = {"path", "label", *BOX_COLUMNS} - csv_columns(path)
    if missing:
        raise DataError(f"{path}: lacks column(s) {', '.join(sorted(missing))} "
                        "(a box CSV needs path,xmin,ymin,xmax,ymax,label)")
    return rows


def _size(row: dict[str, str]) -> tuple[int, int] | None:
    try:
        width, height = int(float(row.get("width") or 0)), int(float(row.get("height") or 0))
    except ValueError:
        return None
    return (width, height) if width > 0 and height > 0 else None


def _split(row: dict[str, str], where: str, issues: LabelIssues) -> str | None | bool:
    raw = row.get("split") or ""
    if raw and raw.lower() not in _SPLITS:
        issues.bad(where, f"unknown split {raw!r} (use train, val or test)")
        return False
    return _SPLITS.get(raw.lower())


def read_box_csv(path: Path, split: str | None, issues: LabelIssues, root: Path | None = None) -> ReadPart:
    """Read a box CSV; rows of one image are grouped, in the order images first appear."""
    entries: dict[str, ImageEntry] = {}
    for line, row in enumerate(_rows(path), 2):
        where = f"{path}:{line}"
        if not row.get("path"):
            issues.bad(where, "empty path")
            continue
        row_split = _split(row, where, issues)
        if row_split is False:
            continue
        entry = entries.get(row["path"])
        if entry is None:
            file = Path(row["path"]).expanduser()
            file = file if file.is_absolute() else path.parent / file
            entry = entries[row["path"]] = ImageEntry(file, where, split or row_split, recorded_size=_size(row),
                                                      frame="stored")
        fields = [row.get(c, "") for c in BOX_COLUMNS]
        if not any(fields):
            continue  # a negative image's row
        try:
            coords = tuple(float(v) for v in fields)
        except ValueError:
            issues.bad(where, f"xmin, ymin, xmax, ymax must be numbers, not {fields}")
            continue
        if not row.get("label"):
            issues.bad(where, "a box without a label")
            continue
        entry.add(coords, row["label"], where)
    return ReadPart(list(entries.values()), None, str(path))
