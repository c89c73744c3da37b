"""COCO detection JSON: ``images``, ``annotations`` (``bbox`` = x, y, width, height in pixels), ``categories``.

Images are looked up relative to the JSON's folder, its ``images/`` sub-folder, the folder
above (``annotations/instances_val.json`` beside ``val/``) and its ``images/``. Class
names are the categories in id order; an image without annotations is a negative.
``iscrowd`` boxes are left out: one box around a crowd teaches a wrong object extent.
Roboflow exports add a category named after the data set that is the supercategory of
all the others and labels nothing; it is left out too.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

from lensforge.data.detection.common import ImageEntry, LabelIssues, ReadPart, find_image, folders_text
from lensforge.errors import DataError


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_id(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def _lists(path: Path, data: Any) -> tuple[list[Any], list[Any], list[Any]]:
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO file (expected an object with images, annotations and categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            what = "is missing" if key not in data else f"is a {type(data[key]).__name__}, not a list"
            raise DataError(f"{path}: '{key}' {what} (a COCO file needs images, annotations and categories lists)")
    return data["images"], data["annotations"], data["categories"]


def _categories(path: Path, categories: list[Any], annotations: list[Any]) -> dict[Any, str]:
    """Category id -> name, in id order, without Roboflow's unused root category."""
    names: dict[Any, str] = {}
    for n, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_id(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataError(f"{path}: categories[{n}] needs an integer 'id' and a string 'name'")
        if cat["id"] in names:
            raise DataError(f"{path}: category id {cat['id']} is listed twice")
        names[cat["id"]] = cat["name"]
    used = {a.get("category_id") for a in annotations if isinstance(a, dict)}
    supers = {c.get("supercategory") for c in categories if isinstance(c, dict)}
    for cat_id, name in list(names.items()):
        if len(names) > 1 and name in supers and cat_id not in used:
            del names[cat_id]
    seen: dict[str, Any] = {}
    for cat_id, name in names.items():
        if name in seen:
            raise DataError(f"{path}: category name {name!r} is used by ids {seen[name]} and {cat_id}")
        seen[name] = cat_id
    return dict(sorted(names.items(), key=lambda item: str(item[0]).zfill(12)))


def _image_folders(path: Path) -> list[Path]:
    folder = path.parent
    folders = [folder, folder / "images", folder.parent, folder.parent / "images"]
    if path.stem.startswith("instances_"):  # COCO's own layout: annotations/instances_val2017.json + val2017/
        folders.insert(2, folder.parent / path.stem.removeprefix("instances_"))
    return folders


def _images(path: Path, images: list[Any], split: str | None, issues: LabelIssues) -> dict[Any, ImageEntry]:
    folders = _image_folders(path)
    entries: dict[Any, ImageEntry] = {}
    for n, image in enumerate(images):
        if not isinstance(image, dict) or not _is_id(image.get("id")) or not isinstance(image.get("file_name"), str):
            issues.bad(f"{path}: images[{n}]", "needs an integer 'id' and a string 'file_name'")
            continue
        where = f"{path}: image id {image['id']}"
        if image["id"] in entries:
            issues.bad(where, "duplicate image id")
            continue
        width, height = image.get("width"), image.get("height")
        if (width is not None or height is not None) and not (_is_number(width) and _is_number(height)):
            issues.bad(where, f"width and height must be numbers, not {width!r} and {height!r}")
            continue
        file = find_image(image["file_name"], folders)
        if file is None:
            issues.bad(where, f"image '{image['file_name']}' not found (looked in {folders_text(folders)})")
            entries[image["id"]] = None  # type: ignore[assignment]  # known id: its annotations are not orphans
            continue
        recorded = (int(width), int(height)) if width and height else None
        entries[image["id"]] = ImageEntry(file, where, split, recorded_size=recorded, frame="display")
    return entries


def _annotation_problem(ann: dict[str, Any], entries: dict[Any, ImageEntry], names: dict[Any, str]) -> str | None:
    if ann.get("image_id") not in entries:
        return f"image_id {ann.get('image_id')!r} is not an image of this file"
    if ann.get("category_id") not in names:
        return f"category_id {ann.get('category_id')!r} is not a category of this file"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return f"bbox must be a list of 4 numbers [x, y, width, height], not {bbox!r}"
    return None


def read_coco(path: Path, split: str | None, issues: LabelIssues, root: Path | None = None) -> ReadPart:
    """Read one COCO JSON file."""
    images, annotations, categories = _lists(path, load_json(path))
    names = _categories(path, categories, annotations)
    entries = _images(path, images, split, issues)
    seen_ids: set[Any] = set()
    for n, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            issues.bad(f"{path}: annotations[{n}]", "is not an object")
            continue
        ann_id = ann.get("id")
        where = f"{path}: annotation id {ann_id}" if _is_id(ann_id) else f"{path}: annotations[{n}]"
        if not _is_id(ann_id):
            issues.bad(where, f"needs an integer 'id', not {ann_id!r}")
            continue
        if ann_id in seen_ids:
            issues.bad(where, "duplicate annotation id")
            continue
        seen_ids.add(ann_id)
        problem = _annotation_problem(ann, entries, names)
        if problem is not None:
            issues.bad(where, problem)
            continue
        entry = entries[ann["image_id"]]
        if entry is None or ann.get("iscrowd"):
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        entry.add((x, y, x + w, y + h), names[ann["category_id"]], where)
    kept = [e for e in entries.values() if e is not None]
    return ReadPart(kept, list(names.values()), str(path))
