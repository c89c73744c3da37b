"""Tiny detection data sets in every format, written per test with Pillow.

Every builder writes the same three 40x30 images: ``a.png`` with a cat, ``b.png`` with a dog
and a cat, ``c.png`` with nothing (a negative), and returns the path to open. Tests reach
the builders and the expected targets through the ``formats`` fixture.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

WIDTH, HEIGHT = 40, 30
CLASSES = ["cat", "dog"]
# image -> [(class, (x1, y1, x2, y2) in pixels)]
OBJECTS: dict[str, list[tuple[str, tuple[float, float, float, float]]]] = {
    "a.png": [("cat", (2, 3, 12, 15))],
    "b.png": [("dog", (20, 10, 38, 28)), ("cat", (5, 5, 15, 25))],
    "c.png": [],
}


def write_image(path: Path, size: tuple[int, int] = (WIDTH, HEIGHT), seed: int = 0,
                orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, exif=exif.tobytes())
    return path


def write_images(folder: Path) -> None:
    for n, name in enumerate(OBJECTS):
        write_image(folder / name, seed=n)


def make_coco(root: Path) -> Path:
    write_images(root / "images")
    images, annotations = [], []
    for image_id, (name, objects) in enumerate(OBJECTS.items(), 1):
        images.append({"id": image_id, "file_name": name, "width": WIDTH, "height": HEIGHT})
        for label, (x1, y1, x2, y2) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                                "category_id": CLASSES.index(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1]})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def yolo_line(label: str, box: tuple[float, ...]) -> str:
    x1, y1, x2, y2 = box
    values = ((x1 + x2) / 2 / WIDTH, (y1 + y2) / 2 / HEIGHT, (x2 - x1) / WIDTH, (y2 - y1) / HEIGHT)
    return f"{CLASSES.index(label)} " + " ".join(f"{v:.6f}" for v in values)


def make_yolo(root: Path) -> Path:
    write_images(root / "images")
    (root / "labels").mkdir(parents=True)
    for name, objects in OBJECTS.items():
        if objects:  # c.png has no label file: a negative
            lines = [yolo_line(label, box) for label, box in objects]
            (root / "labels" / name).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n")
    return root


def voc_xml(filename: str, objects: list, size: tuple[int, int] = (WIDTH, HEIGHT)) -> str:
    parts = [f"<annotation><folder>x</folder><filename>{filename}</filename><path>/home/someone/{filename}</path>",
             f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for label, (x1, y1, x2, y2) in objects:
        parts.append(f"<object><name>{label}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin>"
                     f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def make_voc(root: Path) -> Path:
    write_images(root)  # LabelImg: the XML beside its image
    for name, objects in OBJECTS.items():
        (root / name).with_suffix(".xml").write_text(voc_xml(name, objects))
    return root


def ls_result(label: str, box: tuple[float, ...], n: int) -> dict:
    x1, y1, x2, y2 = box
    value = {"x": 100 * x1 / WIDTH, "y": 100 * y1 / HEIGHT, "width": 100 * (x2 - x1) / WIDTH,
             "height": 100 * (y2 - y1) / HEIGHT, "rotation": 0, "rectanglelabels": [label]}
    return {"id": f"r{n}", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": WIDTH, "original_height": HEIGHT, "value": value}


def make_labelstudio(root: Path) -> Path:
    write_images(root / "images")
    urls = {"a.png": "/data/local-files/?d=home/me/project/images/a.png",  # document root not in the export
            "b.png": "images/b.png",
            "c.png": "/data/upload/3/1a2b3c4d-c.png"}  # upload prefix: 8 hex digits
    tasks = []
    for task_id, (name, objects) in enumerate(OBJECTS.items(), 1):
        results = [ls_result(label, box, n) for n, (label, box) in enumerate(objects)]
        results.append({"id": "ch", "type": "choices", "value": {"choices": ["ok"]}})  # not a box: ignored
        tasks.append({"id": task_id, "data": {"image": urls[name]},
                      "annotations": [{"id": 10 + task_id, "was_cancelled": False, "result": results}]})
    tasks.append({"id": 99, "data": {"image": "images/a.png"}, "annotations": []})  # not annotated: left out
    path = root / "export.json"
    path.write_text(json.dumps(tasks))
    return path


def make_box_csv(root: Path) -> Path:
    write_images(root / "imgs")
    path = root / "boxes.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "xmin", "ymin", "xmax", "ymax", "label"])
        for name, objects in OBJECTS.items():
            for label, box in objects:
                writer.writerow([f"imgs/{name}", *box, label])
            if not objects:
                writer.writerow([f"imgs/{name}", "", "", "", "", ""])
    return path


BUILDERS = {"coco": make_coco, "yolo": make_yolo, "voc": make_voc, "labelstudio": make_labelstudio,
            "box-csv": make_box_csv}


@pytest.fixture
def formats() -> SimpleNamespace:
    """Builders by format name, the objects they write, and image helpers."""
    return SimpleNamespace(build=BUILDERS, objects=OBJECTS, classes=CLASSES, size=(WIDTH, HEIGHT),
                           write_image=write_image, voc_xml=voc_xml, yolo_line=yolo_line)
