"""YOLO folders: ``images/**`` with ``labels/**/*.txt`` mirroring them (or the ``.txt`` beside each image).

A label line is ``class x_center y_center width height`` in [0, 1] of the image (as
Ultralytics reads it, of the image with EXIF orientation applied), or a segmentation
polygon ``class x1 y1 x2 y2 ...`` whose extent is the box. An image without a label
file, or with an empty one, is a negative. Class names come from ``data.yaml``
(``names`` as a list or an id -> name mapping) or ``classes.txt`` / ``obj.names``, in the
folder or the split layout's root. ``images/train``, ``images/val``, ``images/test``
sub-folders give splits; the ``train:``/``val:`` paths inside ``data.yaml`` are not
followed (tools write them relative to different places).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lensforge.data.decode import IMAGE_SUFFIXES
from lensforge.data.detection.common import ImageEntry, LabelIssues, ReadPart
from lensforge.errors import DataError, UsageError

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
TEXT_NAMES = ("classes.txt", "obj.names")
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _parse_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise UsageError(f"{path}: reading data.yaml needs PyYAML: pip install pyyaml") from None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot be read as YAML ({str(e).splitlines()[0]})") from None


def _yaml_names(path: Path) -> list[str]:
    data = _parse_yaml(path)
    names = data.get("names") if isinstance(data, dict) else None
    if names is None and isinstance(data, dict) and isinstance(data.get("nc"), int):
        return [f"class{i}" for i in range(data["nc"])]  # as Ultralytics names them
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{path}: 'names' must map the class ids 0..{len(names) - 1} to names")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: 'names' must be a non-empty list or a mapping of class id to name")
    if isinstance(data.get("nc"), int) and data["nc"] != len(names):
        raise DataError(f"{path}: nc is {data['nc']} but 'names' lists {len(names)} classes")
    return [str(n) for n in names]


def yolo_names(folders: list[Path]) -> tuple[list[str], str] | None:
    """Class names and the file they come from, from the first folder that has a names file."""
    for folder in folders:
        for name in YAML_NAMES:
            if (folder / name).is_file():
                return _yaml_names(folder / name), str(folder / name)
        for sub in (folder, folder / "labels"):
            for name in TEXT_NAMES:
                path = sub / name
                if path.is_file():
                    try:
                        lines = path.read_text(encoding="utf-8-sig").splitlines()
                    except (OSError, UnicodeDecodeError) as e:
                        raise DataError(f"{path}: cannot read class names ({e})") from None
                    return [line.strip() for line in lines if line.strip()], str(path)
    return None


def _pairs(folder: Path) -> list[tuple[Path, Path, str | None]]:
    """(image, label file, split) for every image of the folder."""
    images_dir, labels_dir = folder / "images", folder / "labels"
    pairs = []
    if images_dir.is_dir():
        for image in sorted(images_dir.rglob("*")):
            if image.suffix.lower() in IMAGE_SUFFIXES and image.is_file() and not image.name.startswith("."):
                relative = image.relative_to(images_dir)
                split = _SPLITS.get(relative.parts[0].lower()) if len(relative.parts) > 1 else None
                pairs.append((image, (labels_dir / relative).with_suffix(".txt"), split))
    else:  # darknet layout: the .txt beside its image
        for image in sorted(folder.rglob("*")):
            if image.suffix.lower() in IMAGE_SUFFIXES and image.is_file() and not image.name.startswith("."):
                pairs.append((image, image.with_suffix(".txt"), None))
    return pairs


def _parse_line(line: str) -> tuple[int, tuple[float, float, float, float]] | str:
    """Class id and normalised xyxy, or the reason the line is bad."""
    fields = line.split()
    try:
        class_value = float(fields[0])
        values = [float(v) for v in fields[1:]]
    except ValueError:
        return f"cannot parse {line.strip()!r} (expected: class x_center y_center width height)"
    if not class_value.is_integer():
        return f"class id {fields[0]!r} is not an integer"
    if len(values) == 4:
        cx, cy, w, h = values
        return int(class_value), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    if len(values) >= 6 and len(values) % 2 == 0:  # polygon: its extent
        xs, ys = values[0::2], values[1::2]
        return int(class_value), (min(xs), min(ys), max(xs), max(ys))
    return f"expected 5 values (class x_center y_center width height), found {len(fields)}"


def _read_labels(entry: ImageEntry, label_file: Path, names: list[str], names_from: str,
                 issues: LabelIssues) -> bool:
    """Add the boxes of ``label_file`` to ``entry``; False when the file cannot be read at all."""
    try:
        text = label_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        issues.bad(str(label_file), f"cannot read label file ({e})")
        return False
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{label_file}:{number}"
        parsed = _parse_line(line)
        if isinstance(parsed, str):
            issues.bad(where, parsed)
            continue
        class_id, coords = parsed
        if not 0 <= class_id < len(names):
            issues.bad(where, f"class id {class_id} is not in the {len(names)} names of {names_from}")
            continue
        entry.add(coords, names[class_id], where)
    return True


def read_yolo(folder: Path, split: str | None, issues: LabelIssues, root: Path | None = None) -> ReadPart:
    """Read a YOLO folder (or the folder of a ``data.yaml`` file); names also from the split layout's ``root``."""
    if folder.is_file():
        found: tuple[list[str], str] | None = (_yaml_names(folder), str(folder))
        folder = folder.parent
    else:
        found = yolo_names([folder] + ([root] if root is not None and root != folder else []))
    if found is None:
        raise DataError(f"{folder}: no class names for the YOLO labels (add data.yaml with 'names', or classes.txt)")
    names, names_from = found
    pairs = _pairs(folder)
    entries = []
    for image, label_file, image_split in pairs:
        entry = ImageEntry(image, str(label_file), split or image_split, normalized=True, frame="display")
        if label_file.is_file() and not _read_labels(entry, label_file, names, names_from, issues):
            continue
        entries.append(entry)
    _report_orphans(folder, {label for _, label, _ in pairs}, issues)
    return ReadPart(entries, names, names_from)


def _report_orphans(folder: Path, expected: set[Path], issues: LabelIssues) -> None:
    labels_dir = folder / "labels"
    if not labels_dir.is_dir():
        return
    for label_file in sorted(labels_dir.rglob("*.txt")):
        if label_file not in expected and label_file.name not in TEXT_NAMES and not label_file.name.startswith("."):
            issues.bad(str(label_file), f"no image for this label file (expected {label_file.stem}.* under "
                                        f"{folder / 'images'})")
