"""Writers of detection labels: COCO, YOLO, Pascal VOC and Label Studio, one folder each.

Each writer takes the images of one split (boxes on the decoded pixels, EXIF applied) and
writes its annotation files into ``folder``, in the pixel frame its format's readers
assume (see :mod:`lensforge.data.detection.common`): VOC on the stored pixels, with the
stored size; the others on the rotated image. Files are written with lensforge's atomic
writers; images are placed by :func:`place_images`. Hand-written rather than globox's
``save_*``: its VOC writer writes float coordinates (many VOC readers ``int()`` them)
and no ``depth``, and none of its writers know about EXIF orientation.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from lensforge.data.detection.common import ImageInfo, display_to_stored
from lensforge.registry import Registry
from lensforge.utils.io import atomic_write_json, atomic_write_text


@dataclass
class ExportImage:
    """One image to write: where its pixels come from, its size and orientation, and its boxes."""

    name: str  # POSIX path inside the format's image folder, unique by stem within its folder
    info: ImageInfo
    boxes: np.ndarray  # (K, 4) xyxy on the decoded pixels
    labels: np.ndarray  # (K,) class indices
    source: Path | None = None  # a file to copy
    pixels: np.ndarray | None = None  # or pixels to write as PNG (built-in data)


Writer = Callable[[Path, Sequence[ExportImage], Sequence[str], str], None]
LABEL_WRITERS: Registry[Writer] = Registry("label format", listed=False)
_DECIMALS = 3  # coordinates in pixels: a thousandth of a pixel is more than any annotation holds


def place_images(images: Sequence[ExportImage], folder: Path) -> None:
    """Copy each image file (bytes untouched, EXIF included) or write its pixels as PNG."""
    for image in images:
        target = folder / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if image.source is not None:
            shutil.copyfile(image.source, target)
        else:
            Image.fromarray(image.pixels).save(target, format="PNG")


@LABEL_WRITERS.register("coco")
def write_coco(folder: Path, images: Sequence[ExportImage], class_names: Sequence[str], prefix: str = "") -> None:
    """``annotations.json`` + ``images/``; category ids from 1, boxes [x, y, width, height]."""
    place_images(images, folder / "images")
    records, annotations = [], []
    for image_id, image in enumerate(images, 1):
        width, height = image.info.display_size
        records.append({"id": image_id, "file_name": image.name, "width": width, "height": height})
        for (x1, y1, x2, y2), label in zip(image.boxes.tolist(), image.labels.tolist()):
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [round(v, _DECIMALS) for v in (x1, y1, w, h)],
                                "area": round(w * h, _DECIMALS), "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "none"} for i, name in enumerate(class_names)]
    atomic_write_json(folder / "annotations.json",
                      {"images": records, "annotations": annotations, "categories": categories})


@LABEL_WRITERS.register("yolo")
def write_yolo(folder: Path, images: Sequence[ExportImage], class_names: Sequence[str], prefix: str = "") -> None:
    """``images/`` + ``labels/`` (an empty file for a negative); ``data.yaml`` is written by the caller."""
    place_images(images, folder / "images")
    for image in images:
        width, height = image.info.display_size
        lines = []
        for (x1, y1, x2, y2), label in zip(image.boxes.tolist(), image.labels.tolist()):
            values = ((x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height)
            lines.append(f"{label} " + " ".join(f"{v:.6f}" for v in values))
        label_file = (folder / "labels" / image.name).with_suffix(".txt")
        label_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(label_file, "".join(line + "\n" for line in lines))


def yolo_data_yaml(class_names: Sequence[str], splits: Sequence[str]) -> str:
    """data.yaml as Ultralytics reads it (paths relative to this file); names as JSON strings, valid YAML."""
    if not splits:  # one folder: Ultralytics needs train and val, lensforge splits it itself
        folders = {"train": "images", "val": "images"}
    else:
        folders = {split: f"{split}/images" for split in splits}
        if "val" not in folders and "train" in folders:
            folders["val"] = folders["train"]
    lines = [f"{key}: {json.dumps(value)}" for key, value in folders.items()]
    lines.append(f"nc: {len(class_names)}")
    lines.append("names:")
    lines += [f"  {i}: {json.dumps(name)}" for i, name in enumerate(class_names)]
    return "\n".join(lines) + "\n"


def _voc_xml(image: ExportImage, class_names: Sequence[str]) -> str:
    width, height = image.info.stored_size
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = image.name
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    stored = display_to_stored(image.boxes, image.info)
    for (x1, y1, x2, y2), label in zip(stored.tolist(), image.labels.tolist()):
        # whole pixels, as LabelImg writes them; a box keeps at least one pixel
        xmin, ymin = min(round(x1), width - 1), min(round(y1), height - 1)
        xmax, ymax = max(round(x2), xmin + 1), max(round(y2), ymin + 1)
        obj = ET.SubElement(root, "object")
        for key, value in (("name", class_names[label]), ("pose", "Unspecified"), ("truncated", "0"),
                           ("difficult", "0")):
            ET.SubElement(obj, key).text = value
        box = ET.SubElement(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (xmin, ymin, xmax, ymax)):
            ET.SubElement(box, key).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


@LABEL_WRITERS.register("voc")
def write_voc(folder: Path, images: Sequence[ExportImage], class_names: Sequence[str], prefix: str = "") -> None:
    """``JPEGImages/`` + ``Annotations/*.xml`` (whole-pixel boxes on the stored pixels)."""
    place_images(images, folder / "JPEGImages")
    for image in images:
        xml_file = (folder / "Annotations" / image.name).with_suffix(".xml")
        xml_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(xml_file, _voc_xml(image, class_names))


@LABEL_WRITERS.register("labelstudio")
def write_labelstudio(folder: Path, images: Sequence[ExportImage], class_names: Sequence[str],
                      prefix: str = "") -> None:
    """``tasks.json`` + ``images/``; images as ``/data/local-files/?d=PATH``, PATH relative to the output root.

    Import it with Label Studio's local file serving, its document root set to the output folder.
    """
    place_images(images, folder / "images")
    tasks = []
    for task_id, image in enumerate(images, 1):
        width, height = image.info.display_size
        results = []
        for (x1, y1, x2, y2), label in zip(image.boxes.tolist(), image.labels.tolist()):
            value = {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                     "height": 100 * (y2 - y1) / height, "rotation": 0, "rectanglelabels": [class_names[label]]}
            results.append({"id": f"{task_id}-{len(results) + 1}", "type": "rectanglelabels", "from_name": "label",
                            "to_name": "image", "original_width": width, "original_height": height,
                            "image_rotation": 0, "value": value})
        path = str(PurePosixPath(prefix, "images", image.name)) if prefix else f"images/{image.name}"
        tasks.append({"id": task_id, "data": {"image": "/data/local-files/?d=" + urllib.parse.quote(path)},
                      "annotations": [{"id": task_id, "result": results, "was_cancelled": False}]})
    atomic_write_json(folder / "tasks.json", tasks)
