"""Pascal VOC XML, as LabelImg writes it: one ``.xml`` per image, beside it or under ``Annotations/``.

Each ``<object>`` has a ``<name>`` and a ``<bndbox>`` (``xmin ymin xmax ymax`` in pixels,
read as continuous coordinates, as LabelImg writes them; ``difficult`` objects are kept).
The image is ``<filename>`` beside the XML, in ``JPEGImages/`` or ``images/``, else the
XML's stem with an image suffix. Boxes are on the stored pixels (LabelImg does not apply
EXIF orientation) unless ``<size>`` matches only the rotated image. Only images with an
XML file are read (an image without one is unannotated, not a negative); an XML without
objects is a negative. Class names: the sorted names found.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from lensforge.data.detection.common import ImageEntry, LabelIssues, ReadPart, find_image, folders_text

_COORDS = ("xmin", "ymin", "xmax", "ymax")


def voc_files(folder: Path) -> list[Path]:
    annotations = folder / "Annotations"
    if annotations.is_dir():
        return sorted(p for p in annotations.rglob("*.xml") if not p.name.startswith("."))
    return sorted(p for p in folder.glob("*.xml") if not p.name.startswith("."))


def _size(root: ET.Element) -> tuple[int, int] | None:
    try:
        width, height = (int(float(root.findtext(f"size/{key}") or 0)) for key in ("width", "height"))
    except ValueError:
        return None
    return (width, height) if width > 0 and height > 0 else None  # LabelImg writes 0 when it did not know


def _image(xml_path: Path, root: ET.Element, folder: Path) -> tuple[Path | None, str, list[Path]]:
    folders = [xml_path.parent, folder / "JPEGImages", folder / "images", xml_path.parent.parent / "JPEGImages",
               folder]
    name = (root.findtext("filename") or "").strip()
    image = find_image(name, folders) if name else None
    if image is None and not name:
        image = find_image(xml_path.stem, folders)
    return image, name or xml_path.stem, folders


def _objects(xml_path: Path, root: ET.Element, entry: ImageEntry, issues: LabelIssues) -> None:
    for number, obj in enumerate(root.iter("object"), 1):
        where = f"{xml_path}: object {number}"
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            issues.bad(where, "needs a <name> and a <bndbox>")
            continue
        texts = [box.findtext(key) for key in _COORDS]
        try:
            coords = tuple(float(t) for t in texts)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            issues.bad(where, f"<bndbox> needs numbers xmin, ymin, xmax, ymax, not {texts}")
            continue
        entry.add(coords, name, where)


def read_voc(folder: Path, split: str | None, issues: LabelIssues, root: Path | None = None) -> ReadPart:
    """Read every VOC XML file of ``folder`` (or ``folder/Annotations``)."""
    entries = []
    for xml_path in voc_files(folder):
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            issues.bad(str(xml_path), f"not valid XML ({e})")
            continue
        except OSError as e:
            issues.bad(str(xml_path), f"cannot read file ({e.strerror or e})")
            continue
        if tree.tag != "annotation":
            issues.bad(str(xml_path), f"not a Pascal VOC annotation (root element <{tree.tag}>, not <annotation>)")
            continue
        image, name, folders = _image(xml_path, tree, folder)
        if image is None:
            issues.bad(str(xml_path), f"image '{name}' not found (looked in {folders_text(folders)})")
            continue
        entry = ImageEntry(image, str(xml_path), split, recorded_size=_size(tree), frame="stored")
        _objects(xml_path, tree, entry, issues)
        entries.append(entry)
    return ReadPart(entries, None, str(folder))
