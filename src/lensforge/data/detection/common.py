"""What every detection reader shares: the parsed image, the bad-label policy, EXIF, the Source.

A reader parses its annotation files into :class:`ImageEntry` s (boxes in the units and
pixel frame of its format) and hands them to :func:`build_source`, which probes every
image once (size and EXIF orientation, from the header only), brings the boxes into the
pixels :func:`lensforge.data.decode.decode_image` returns (EXIF applied), clips them to
the image and checks them. Bad labels go through one :class:`LabelIssues`.

Which pixel frame do boxes refer to when an image carries an EXIF orientation? The
decoder rotates the pixels, so a box drawn on the stored (unrotated) pixels must be
rotated the same way. Tools differ: LabelImg (Pascal VOC) shows the stored pixels;
Ultralytics (YOLO), detectron2 and mmdetection (COCO) and Label Studio (a browser) show
the rotated image. Each format therefore names a default frame, and an image size the
file records (VOC ``size``, COCO ``width``/``height``, Label Studio ``original_width``)
overrides it whenever it matches only one of the two frames.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lensforge.data.decode import IMAGE_SUFFIXES
from lensforge.data.sources import SampleRecord, Source
from lensforge.errors import DataError, UsageError
from lensforge.tasks.detection import BoxTarget

ON_BAD_LABEL = ("fail", "skip")
SKIP_HINT = " (use --on-bad-label skip to skip bad labels)"
_EXIF_ORIENTATION = 0x0112


def check_policy(on_bad_label: str) -> str:
    if on_bad_label not in ON_BAD_LABEL:
        raise UsageError(f"--on-bad-label must be one of {', '.join(ON_BAD_LABEL)}, not {on_bad_label!r}")
    return on_bad_label


class LabelIssues:
    """Bad labels: raise a DataError on the first one ("fail") or record it and go on ("skip")."""

    def __init__(self, on_bad_label: str = "fail") -> None:
        self.policy = check_policy(on_bad_label)
        self.problems: list[dict[str, str]] = []

    def bad(self, where: str, reason: str) -> None:
        """``where`` names the file and the line or id: "labels/a.txt:3", "x.json: annotation id 7"."""
        line = f"{where}: {reason}"
        if self.policy == "fail":
            raise DataError(line + SKIP_HINT)
        self.problems.append({"origin": where, "reason": line})


@dataclass
class ImageEntry:
    """One annotated image as a reader found it, before checks.

    Attributes:
        image: the image file.
        where: names the annotation of this image in messages ("a.xml", "x.json: image id 3").
        split: train/val/test when the layout fixes it.
        coords: (K, 4) x1, y1, x2, y2 in pixels, or in [0, 1] of the image when ``normalized``.
        labels: class name of each box.
        box_wheres: names each box in messages (file and line, object or id).
        recorded_size: (width, height) the annotation states, if any.
        frame: "display" (EXIF applied) or "stored": the format's default pixel frame.
    """

    image: Path
    where: str
    split: str | None = None
    coords: list[Sequence[float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    box_wheres: list[str] = field(default_factory=list)
    recorded_size: tuple[int, int] | None = None
    normalized: bool = False
    frame: str = "display"

    def add(self, coords: Sequence[float], label: str, where: str) -> None:
        self.coords.append(coords)
        self.labels.append(label)
        self.box_wheres.append(where)


@dataclass
class ReadPart:
    """What a reader made of one folder or file: its images and, if the format lists them, class names."""

    entries: list[ImageEntry]
    names: list[str] | None = None
    names_from: str = ""


@dataclass(frozen=True)
class ImageInfo:
    """An image's stored (width, height) and EXIF orientation (1..8, 1 = none)."""

    stored_size: tuple[int, int]
    orientation: int = 1

    @property
    def display_size(self) -> tuple[int, int]:
        w, h = self.stored_size
        return (h, w) if self.orientation >= 5 else (w, h)


def probe_image(path: Path) -> ImageInfo | str:
    """Size and orientation from the header (no pixel decoding); a reason string when unreadable."""
    try:
        with Image.open(path) as img:
            return ImageInfo(img.size, _orientation(img))
    except FileNotFoundError:
        return f"image {path} not found"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"image {path} cannot be read ({e})"


def _orientation(img: Image.Image) -> int:
    try:
        if img.format == "PNG":  # getexif() on a PNG decodes it all when no eXIf chunk precedes the pixels
            exif = Image.Exif()
            if img.info.get("exif"):
                exif.load(img.info["exif"])
        else:
            exif = img.getexif()
        orientation = exif.get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: Pillow's parsers raise many kinds; the pixels are still there
        return 1
    return orientation if orientation in range(1, 9) else 1


# (x, y) in the stored pixels -> the same point after PIL's exif_transpose, for each orientation;
# w, h: the size of the frame the point is in.
_TO_DISPLAY: dict[int, Callable[[np.ndarray, np.ndarray, float, float], tuple[np.ndarray, np.ndarray]]] = {
    1: lambda x, y, w, h: (x, y),
    2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y),
    4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x),
    6: lambda x, y, w, h: (h - y, x),
    7: lambda x, y, w, h: (h - y, w - x),
    8: lambda x, y, w, h: (y, w - x),
}
_INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def _map_boxes(boxes: np.ndarray, orientation: int, size: tuple[int, int]) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ax, ay = _TO_DISPLAY[orientation](boxes[:, 0], boxes[:, 1], *size)
    bx, by = _TO_DISPLAY[orientation](boxes[:, 2], boxes[:, 3], *size)
    return np.stack([np.minimum(ax, bx), np.minimum(ay, by), np.maximum(ax, bx), np.maximum(ay, by)], axis=1)


def stored_to_display(boxes: np.ndarray, info: ImageInfo) -> np.ndarray:
    """xyxy boxes on the stored pixels -> on the decoded (EXIF-applied) pixels."""
    return _map_boxes(boxes, info.orientation, info.stored_size)


def display_to_stored(boxes: np.ndarray, info: ImageInfo) -> np.ndarray:
    """The inverse of :func:`stored_to_display`."""
    return _map_boxes(boxes, _INVERSE[info.orientation], info.display_size)


def find_image(name: str, folders: Sequence[Path]) -> Path | None:
    """The first existing ``folder/name``; a name without a suffix tries the image suffixes."""
    candidate = Path(name)
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    for folder in folders:
        path = folder / candidate
        if path.is_file():
            return path
        if not candidate.suffix:
            for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
                if path.with_name(path.name + suffix).is_file():
                    return path.with_name(path.name + suffix)
    return None


def folders_text(folders: Sequence[Path]) -> str:
    return ", ".join(str(f) for f in dict.fromkeys(folders))


# ----------------------------------------------------------------------------- the Source


def build_source(spec: str, parts: Sequence[ReadPart], issues: LabelIssues) -> Source:
    """Check every entry against its image and make the detection Source (records in reader order)."""
    class_names = _class_names(parts)
    index = {name: i for i, name in enumerate(class_names)}
    entries = _unique_images([e for part in parts for e in part.entries], issues)
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        infos = list(pool.map(probe_image, [e.image for e in entries]))
    records = []
    for entry, info in zip(entries, infos):
        if isinstance(info, str):
            issues.bad(entry.where, info)
            continue
        target = _target(entry, info, index, issues)
        if target is not None:
            records.append(SampleRecord(target, str(entry.image), entry.split))
    if not records:
        raise DataError(f"'{spec}' has no usable annotated images ({len(issues.problems)} problems skipped)")
    return Source(spec, "detection", class_names, records, problems=issues.problems)


def _class_names(parts: Sequence[ReadPart]) -> list[str]:
    declared = [(part.names, part.names_from) for part in parts if part.names is not None]
    if declared:
        names, origin = declared[0]
        for other, other_origin in declared[1:]:
            if other != names:
                raise DataError(f"{other_origin} lists the classes {other} but {origin} lists {names}: "
                                "every split must use one class list")
        return list(names)
    found = sorted({label for part in parts for entry in part.entries for label in entry.labels})
    if not found:
        raise DataError(f"{parts[0].names_from or 'the data'}: no labelled object in any image")
    return found


def _unique_images(entries: list[ImageEntry], issues: LabelIssues) -> list[ImageEntry]:
    seen: dict[Path, str] = {}
    kept = []
    for entry in entries:
        key = Path(os.path.abspath(entry.image))
        if key in seen:
            issues.bad(entry.where, f"image {entry.image} is annotated twice (also by {seen[key]})")
            continue
        seen[key] = entry.where
        kept.append(entry)
    return kept


def _frame(entry: ImageEntry, info: ImageInfo, issues: LabelIssues) -> str | None:
    """The pixel frame of the entry's boxes; None (after reporting) when its recorded size fits neither."""
    recorded = entry.recorded_size
    if recorded is None:
        return entry.frame
    stored, display = info.stored_size, info.display_size
    if recorded not in (stored, display):
        if entry.normalized:  # relative coordinates do not depend on the pixel count
            return entry.frame
        issues.bad(entry.where, f"the annotation says the image is {recorded[0]}x{recorded[1]} "
                                f"but {entry.image.name} is {display[0]}x{display[1]}")
        return None
    if stored == display:
        return entry.frame
    return "display" if recorded == display else "stored"


def _target(entry: ImageEntry, info: ImageInfo, index: dict[str, int], issues: LabelIssues) -> BoxTarget | None:
    frame = _frame(entry, info, issues)
    if frame is None:
        return None
    coords = np.array(entry.coords, dtype=np.float64).reshape(-1, 4)
    if entry.normalized:
        coords = coords * np.tile(info.display_size if frame == "display" else info.stored_size, 2)
    # checked in the annotation's own frame: rotating would turn an inverted box into a valid one
    mapped = stored_to_display(coords, info) if frame == "stored" and info.orientation != 1 else coords
    width, height = info.display_size
    clipped = np.clip(mapped, 0, np.array([width, height, width, height], dtype=np.float64))
    boxes, labels = [], []
    for raw, box, label, where in zip(coords, clipped, entry.labels, entry.box_wheres):
        reason = _box_problem(raw, box, (width, height))
        if reason is None and label not in index:
            reason = f"class {label!r} is not one of the class names"
        if reason is not None:
            issues.bad(where, reason)
            continue
        boxes.append(box)
        labels.append(index[label])
    return BoxTarget(np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64))


def _box_problem(raw: np.ndarray, clipped: np.ndarray, size: tuple[int, int]) -> str | None:
    """Why a box is unusable: ``raw`` in the annotation's units and frame, ``clipped`` on the decoded image."""
    if not all(math.isfinite(v) for v in raw):
        return "box has a NaN or infinite coordinate"
    if raw[2] <= raw[0] or raw[3] <= raw[1]:
        return (f"degenerate box (width {raw[2] - raw[0]:.4g}, height {raw[3] - raw[1]:.4g} pixels; "
                "x1 < x2 and y1 < y2 are needed)")
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return (f"box [{raw[0]:.4g}, {raw[1]:.4g}, {raw[2]:.4g}, {raw[3]:.4g}] lies outside "
                f"the {size[0]}x{size[1]} image")
    return None
