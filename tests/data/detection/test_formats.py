"""Every detection format reads into the same targets; layouts, negatives, classification untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import tree_digest, write_image_folder

from lensforge.data import load_table, open_source
from lensforge.data.detection import FORMATS, detect_format
from lensforge.data.preprocess import Preprocess
from lensforge.data.sources import SOURCES
from lensforge.errors import UsageError
from lensforge.tasks.detection import BoxTarget


def assert_targets(source, formats, names=("a.png", "b.png", "c.png"), atol=1e-3):
    assert source.task == "detection" and source.class_names == formats.classes
    by_name = {Path(r.origin).name: r.target for r in source.records}
    assert sorted(by_name) == sorted(names)
    for name in names:
        target = by_name[name]
        assert isinstance(target, BoxTarget)
        expected = formats.objects[name]
        assert target.labels.tolist() == [formats.classes.index(label) for label, _ in expected]
        np.testing.assert_allclose(target.boxes, np.array([box for _, box in expected]).reshape(-1, 4), atol=atol)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_the_same_targets(tmp_path, formats, fmt):
    path = formats.build[fmt](tmp_path)
    digest = tree_digest(tmp_path)
    assert detect_format(path) == fmt
    source = open_source(path)
    assert_targets(source, formats)
    assert len(source.records[2].target) == 0  # c.png: a negative, kept
    assert source.spec == str(path) and source.records[0].split is None
    assert tree_digest(tmp_path) == digest  # source files are only read
    if fmt == "labelstudio":  # the task without annotations is left out and said so, not an error
        assert [p["reason"] for p in source.problems] == [f"{path}: task 99: not annotated (left out)"]
    else:
        assert source.problems == []


@pytest.mark.parametrize("fmt", ["coco", "labelstudio", "box-csv"])
def test_file_formats_open_from_their_folder(tmp_path, formats, fmt):
    path = formats.build[fmt](tmp_path)
    assert path.is_file() and detect_format(tmp_path) == fmt
    assert_targets(open_source(tmp_path), formats)


def test_registered_sources_and_their_options(tmp_path, formats):
    assert set(FORMATS) <= set(SOURCES)
    path = formats.build["coco"](tmp_path)
    assert_targets(SOURCES.get("coco")(path=path), formats)
    with pytest.raises(UsageError, match="unknown option.*colour"):
        open_source(path, colour="red")
    with pytest.raises(UsageError, match="--on-bad-label must be one of fail, skip"):
        open_source(path, on_bad_label="ignore")


def test_coco_layouts(tmp_path, formats):
    # COCO's own: annotations/instances_val.json beside val/
    json_path = formats.build["coco"](tmp_path / "a")
    root = tmp_path / "b"
    (root / "annotations").mkdir(parents=True)
    shutil.copytree(json_path.parent / "images", root / "val")
    shutil.copy(json_path, root / "annotations" / "instances_val.json")
    assert_targets(open_source(root), formats)
    # Roboflow's: an unused root category that is the supercategory of the others; images beside the json
    data = json.loads(json_path.read_text())
    data["categories"] = [{"id": 0, "name": "pets", "supercategory": "none"}] + [
        dict(c, supercategory="pets") for c in data["categories"]]
    folder = tmp_path / "c"
    shutil.copytree(json_path.parent / "images", folder)
    (folder / "_annotations.coco.json").write_text(json.dumps(data))
    assert_targets(open_source(folder), formats)


def test_coco_crowd_boxes_are_left_out(tmp_path, formats):
    path = formats.build["coco"](tmp_path)
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 50, "image_id": 3, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1})
    path.write_text(json.dumps(data))
    assert len(open_source(path).records[2].target) == 0


def test_yolo_names_polygons_and_darknet_layout(tmp_path, formats):
    root = formats.build["yolo"](tmp_path / "y")
    (root / "data.yaml").unlink()
    (root / "labels" / "classes.txt").write_text("cat\ndog\n")  # LabelImg's YOLO mode
    polygon = "1 0.5 0.333333 0.95 0.333333 0.95 0.933333 0.5 0.933333"  # the dog, as a segment
    (root / "labels" / "b.txt").write_text(polygon + "\n" + formats.yolo_line("cat", (5, 5, 15, 25)) + "\n\n")
    assert_targets(open_source(root), formats)
    darknet = tmp_path / "d"
    shutil.copytree(root / "images", darknet)
    for label in (root / "labels").glob("*.txt"):
        shutil.copy(label, darknet / label.name)
    assert detect_format(darknet) == "yolo"
    assert_targets(open_source(darknet), formats)
    cvat = tmp_path / "cvat"  # CVAT's YOLO 1.1 export: obj.names beside obj_train_data/
    shutil.copytree(darknet, cvat / "obj_train_data")
    (cvat / "obj_train_data" / "classes.txt").rename(cvat / "obj.names")
    assert detect_format(cvat) == "yolo"
    assert_targets(open_source(cvat), formats)
    (root / "data.yaml").write_text("nc: 2\nnames: [cat, dog]\n")
    assert_targets(open_source(root / "data.yaml"), formats)


def test_yolo_empty_label_file_is_a_negative(tmp_path, formats):
    root = formats.build["yolo"](tmp_path)
    (root / "labels" / "c.txt").write_text("")
    assert len(open_source(root).records[2].target) == 0


def test_voc_annotations_and_jpegimages_layout(tmp_path, formats):
    flat = formats.build["voc"](tmp_path / "flat")
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for file in flat.iterdir():
        shutil.copy(file, root / ("Annotations" if file.suffix == ".xml" else "JPEGImages") / file.name)
    assert detect_format(root) == "voc"
    assert_targets(open_source(root), formats)


def test_box_csv_aliases_and_extra_columns(tmp_path, formats):
    formats.build["box-csv"](tmp_path)
    text = (tmp_path / "boxes.csv").read_text().replace("path,", "filename,", 1).replace(",label", ",class", 1)
    (tmp_path / "tf.csv").write_text(text)
    (tmp_path / "boxes.csv").unlink()
    assert_targets(open_source(tmp_path / "tf.csv"), formats)


@pytest.mark.parametrize("fmt", FORMATS)
def test_split_layout(tmp_path, formats, fmt):
    root = tmp_path / "data"
    for split in ("train", "valid", "test"):
        formats.build[fmt](root / split)
    if fmt == "yolo":  # Roboflow: one data.yaml at the root
        for split in ("train", "valid", "test"):
            (root / split / "data.yaml").unlink()
        (root / "data.yaml").write_text("names: [cat, dog]\nnc: 2\n")
    assert detect_format(root) == fmt
    source = open_source(root)
    assert [r.split for r in source.records] == ["train"] * 3 + ["val"] * 3 + ["test"] * 3
    assert source.class_names == formats.classes


def test_yolo_split_subfolders_under_images(tmp_path, formats):
    root = formats.build["yolo"](tmp_path)
    for split, name in (("train", "a"), ("train", "b"), ("val", "c")):
        for kind, suffix in (("images", ".png"), ("labels", ".txt")):
            file = root / kind / (name + suffix)
            if file.exists():
                (root / kind / split).mkdir(exist_ok=True)
                file.rename(root / kind / split / file.name)
    source = open_source(root)
    assert [r.split for r in source.records] == ["train", "train", "val"]
    assert_targets(source, formats)


def test_classification_data_is_opened_as_before(tmp_path):
    folder = write_image_folder(tmp_path / "cls")
    (folder / "classes.txt").write_text("cat\ndog\n")  # names and notes, but no YOLO labels
    (folder / "notes.txt").write_text("from the shelter\n")
    assert detect_format(folder) is None
    source = open_source(folder, on_bad_label="skip")  # accepted and ignored
    assert source.task == "classification" and source.class_names == ["cat", "dog"] and source.problems == []
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(folder.rglob("*.png"))))
    assert detect_format(manifest) is None
    assert open_source(manifest, on_bad_label="fail").task == "classification"
    with pytest.raises(UsageError, match="unknown option"):
        open_source(folder, colour="red")
    split = tmp_path / "split"
    for name in ("train", "val"):
        write_image_folder(split, split=name)
    assert detect_format(split) is None and open_source(split).task == "classification"


def test_load_table_scales_boxes_into_letterboxed_input(tmp_path, formats):
    path = formats.build["coco"](tmp_path)
    table = load_table(open_source(path), Preprocess(input_size=(64, 64), fit="letterbox"), cache=False)
    assert table.images.shape == (3, 3, 64, 64) and table.task == "detection"
    scale = 64 / 40  # the 40x30 image fits by its width
    np.testing.assert_allclose(table.targets[0].boxes, np.array([[2, 3, 12, 15]]) * scale, rtol=1e-6)
    np.testing.assert_allclose(table.targets[1].boxes, np.array([[20, 10, 38, 28], [5, 5, 15, 25]]) * scale,
                               rtol=1e-6)
    assert table.targets[1].labels.tolist() == [1, 0] and len(table.targets[2]) == 0


def test_labelstudio_rotated_rectangle_gives_its_extent(tmp_path, formats):
    path = formats.build["labelstudio"](tmp_path)
    tasks = json.loads(path.read_text())
    # 8x3 pixels at (4, 3) on the 40x30 image, turned 90 degrees clockwise about its top-left corner
    tasks[0]["annotations"][0]["result"][0]["value"].update(x=10, y=10, width=20, height=10, rotation=90)
    path.write_text(json.dumps(tasks))
    np.testing.assert_allclose(open_source(path).records[0].target.boxes, [[1, 3, 4, 11]], atol=1e-4)
