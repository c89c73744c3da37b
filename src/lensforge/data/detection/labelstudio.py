"""Label Studio JSON export: a list of tasks with ``rectanglelabels`` results.

A box is ``value.x, y, width, height`` in percent of the image (and ``rotation`` in degrees
about its top-left corner: the box is then the rotated rectangle's extent). The image is
``data.image``: ``/data/local-files/?d=PATH`` is looked up under the JSON's folder (PATH,
then PATH without its leading folders, since the document root Label Studio served it
from is not in the export), an upload (``/data/upload/3/1a2b3c4d-name.jpg``) or a URL by
its file name (with or without the upload prefix) beside the JSON or in ``images/``.
Boxes are on the image as a browser shows it (EXIF applied) unless ``original_width``/
``original_height`` match only the stored pixels. The first annotation that was not
cancelled is used; a task without one is unannotated and left out (recorded in
``problems``, never an error); an annotation without boxes is a negative.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from pathlib import Path
from typing import Any

from lensforge.data.detection.coco import load_json
from lensforge.data.detection.common import ImageEntry, LabelIssues, ReadPart, find_image, folders_text
from lensforge.errors import DataError

_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # Label Studio prefixes uploaded file names with 8 hex digits


def _candidates(image: str) -> list[str]:
    """Relative names to look for, most specific first."""
    parsed = urllib.parse.urlparse(image)
    if parsed.path.startswith("/data/local-files") and parsed.query:
        local = urllib.parse.parse_qs(parsed.query).get("d", [""])[0]
        parts = Path(local.lstrip("/")).parts
        names = [str(Path(*parts[i:])) for i in range(len(parts))]
        return names + ([local] if local.startswith("/") else [])
    name = Path(urllib.parse.unquote(parsed.path)).name
    if parsed.scheme in ("", "file") and not parsed.path.startswith("/data/"):
        names = [urllib.parse.unquote(parsed.path)]
    else:
        names = []
    return names + [name] + ([_UPLOAD_PREFIX.sub("", name)] if _UPLOAD_PREFIX.match(name) else [])


def _find(image: str, folders: list[Path]) -> Path | None:
    for name in _candidates(image):
        found = find_image(name, folders)
        if found is not None:
            return found
    return None


def _annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    for annotation in task.get("annotations") or []:
        if isinstance(annotation, dict) and not annotation.get("was_cancelled"):
            return annotation
    return None


def _rect(value: dict[str, Any], size: tuple[float, float]) -> tuple[float, float, float, float] | str:
    """Normalised xyxy of a (possibly rotated) rectangle, or the reason it is bad; ``size``: original (w, h)."""
    keys = ("x", "y", "width", "height")
    numbers = [value.get(k) for k in keys]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        return f"value needs numbers x, y, width, height (percent), not {numbers}"
    x, y, w, h = (float(v) / 100 for v in numbers)
    angle = math.radians(float(value.get("rotation") or 0))
    if angle == 0:
        return x, y, x + w, y + h
    # rotate in pixels (the rotation is in the image's pixels, not in percent), about the top-left corner
    sx, sy = size
    c, s = math.cos(angle), math.sin(angle)
    corners = [(dx * sx, dy * sy) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    xs = [x + (dx * c - dy * s) / sx for dx, dy in corners]
    ys = [y + (dx * s + dy * c) / sy for dx, dy in corners]
    return min(xs), min(ys), max(xs), max(ys)


def _results(entry: ImageEntry, where: str, results: list[Any], issues: LabelIssues) -> None:
    for number, result in enumerate(results, 1):
        if not isinstance(result, dict) or result.get("type") != "rectanglelabels":
            continue  # choices, text areas, keypoints: not boxes
        box_where = f"{where} result {result.get('id', number)}"
        value = result.get("value")
        labels = value.get("rectanglelabels") if isinstance(value, dict) else None
        if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
            issues.bad(box_where, f"needs exactly one name in value.rectanglelabels, not {labels!r}")
            continue
        width, height = result.get("original_width"), result.get("original_height")
        known = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (width, height))
        if known:
            entry.recorded_size = (round(width), round(height))
        rect = _rect(value, (float(width), float(height)) if known else (1.0, 1.0))
        if isinstance(rect, str):
            issues.bad(box_where, rect)
            continue
        entry.add(rect, labels[0], box_where)


def read_labelstudio(path: Path, split: str | None, issues: LabelIssues, root: Path | None = None) -> ReadPart:
    """Read a Label Studio JSON export (the full format, a list of tasks)."""
    tasks = load_json(path)
    if not isinstance(tasks, list):
        raise DataError(f"{path}: not a Label Studio export (expected a list of tasks)")
    folders = [path.parent, path.parent / "images"]
    entries, seen_ids = [], set()
    for number, task in enumerate(tasks):
        task_id = task.get("id", number) if isinstance(task, dict) else number
        where = f"{path}: task {task_id}"
        image = task.get("data", {}).get("image") if isinstance(task, dict) else None
        if not isinstance(image, str) or not image:
            issues.bad(where, "needs data.image, the image's path or URL")
            continue
        if task_id in seen_ids:
            issues.bad(where, "duplicate task id")
            continue
        seen_ids.add(task_id)
        annotation = _annotation(task)
        if annotation is None:
            issues.problems.append({"origin": where, "reason": f"{where}: not annotated (left out)"})
            continue
        file = _find(image, folders)
        if file is None:
            issues.bad(where, f"image '{image}' not found (looked in {folders_text(folders)})")
            continue
        entry = ImageEntry(file, where, split, normalized=True, frame="display")
        results = annotation.get("result") or []
        if not isinstance(results, list):
            issues.bad(where, f"annotation result must be a list, not {type(results).__name__}")
            continue
        _results(entry, where, results, issues)
        entries.append(entry)
    return ReadPart(entries, None, str(path))
