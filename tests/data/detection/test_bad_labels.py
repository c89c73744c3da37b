"""Every kind of bad label: one line naming the file (and line or id); with skip, left out and listed."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from lensforge.data import open_source
from lensforge.errors import DataError

SKIP_HINT = " (use --on-bad-label skip to skip bad labels)"


def edit_json(path: Path, change: Callable[[object], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text)
    path.write_text(text.replace(old, new, 1))


def coco_ann(data, n: int, **changes) -> None:
    data["annotations"][n].update(changes)


# (format, how to spoil what the builder wrote, the message after the file name, images left with skip)
LABEL_CASES = {
    "coco-duplicate-image-id": ("coco", lambda p: edit_json(p, lambda d: d["images"][2].update(id=2)),
                                r"annotations\.json: image id 2: duplicate image id", 2),
    "coco-duplicate-annotation-id": ("coco", lambda p: edit_json(p, lambda d: coco_ann(d, 1, id=1)),
                                     r"annotations\.json: annotation id 1: duplicate annotation id", 3),
    "coco-image-not-found": ("coco", lambda p: edit_json(p, lambda d: d["images"][0].update(file_name="zz.png")),
                             r"annotations\.json: image id 1: image 'zz\.png' not found \(looked in .*\)", 2),
    "coco-unknown-category": ("coco", lambda p: edit_json(p, lambda d: coco_ann(d, 1, category_id=9)),
                              r"annotations\.json: annotation id 2: category_id 9 is not a category", 3),
    "coco-bbox-wrong-type": ("coco", lambda p: edit_json(p, lambda d: coco_ann(d, 0, bbox="2,3,10,12")),
                             r"annotations\.json: annotation id 1: bbox must be a list of 4 numbers", 3),
    "coco-bbox-missing": ("coco", lambda p: edit_json(p, lambda d: d["annotations"][0].pop("bbox")),
                          r"annotations\.json: annotation id 1: bbox must be a list of 4 numbers", 3),
    "coco-image-id-missing": ("coco", lambda p: edit_json(p, lambda d: d["images"][2].pop("id")),
                              r"annotations\.json: images\[2\]: needs an integer 'id' and a string 'file_name'", 2),
    "coco-nan-box": ("coco", lambda p: edit_json(p, lambda d: coco_ann(d, 0, bbox=[float("nan"), 3, 10, 12])),
                     r"annotations\.json: annotation id 1: box has a NaN or infinite coordinate", 3),
    "coco-zero-width": ("coco", lambda p: edit_json(p, lambda d: coco_ann(d, 0, bbox=[2, 3, 0, 12])),
                        r"annotations\.json: annotation id 1: degenerate box \(width 0, height 12", 3),
    "coco-box-outside": ("coco", lambda p: edit_json(p, lambda d: coco_ann(d, 0, bbox=[50, 3, 10, 12])),
                         r"annotations\.json: annotation id 1: box \[50, 3, 60, 15\] lies outside the 40x30 image", 3),
    "coco-wrong-size": ("coco", lambda p: edit_json(p, lambda d: d["images"][1].update(width=80, height=60)),
                        r"annotations\.json: image id 2: the annotation says the image is 80x60 but b\.png is 40x30",
                        2),
    "yolo-unparsable-line": ("yolo", lambda p: replace(p / "labels" / "a.txt", "0 ", "0 abc "),
                             r"labels/a\.txt:1: cannot parse '0 abc .*' \(expected: class x_center", 3),
    "yolo-class-not-in-names": ("yolo", lambda p: replace(p / "labels" / "b.txt", "1 ", "5 "),
                                r"labels/b\.txt:1: class id 5 is not in the 2 names of .*data\.yaml", 3),
    "yolo-too-few-values": ("yolo", lambda p: (p / "labels" / "a.txt").write_text("0 0.5 0.5 0.1\n"),
                            r"labels/a\.txt:1: expected 5 values .*found 4", 3),
    "yolo-orphan-label": ("yolo", lambda p: (p / "labels" / "zz.txt").write_text("0 0.5 0.5 0.1 0.1\n"),
                          r"labels/zz\.txt: no image for this label file", 3),
    "yolo-box-outside": ("yolo", lambda p: (p / "labels" / "a.txt").write_text("0 1.5 0.5 0.2 0.2\n"),
                         r"labels/a\.txt:1: box \[.*\] lies outside the 40x30 image", 3),
    "yolo-negative-size": ("yolo", lambda p: (p / "labels" / "a.txt").write_text("0 0.5 0.5 -0.2 0.2\n"),
                           r"labels/a\.txt:1: degenerate box", 3),
    "yolo-nan": ("yolo", lambda p: (p / "labels" / "a.txt").write_text("0 nan 0.5 0.2 0.2\n"),
                 r"labels/a\.txt:1: box has a NaN", 3),
    "voc-unparsable-xml": ("voc", lambda p: replace(p / "a.xml", "</annotation>", ""),
                           r"a\.xml: not valid XML \(no element found", 2),
    "voc-wrong-root": ("voc", lambda p: (p / "a.xml").write_text("<html></html>"),
                       r"a\.xml: not a Pascal VOC annotation \(root element <html>", 2),
    "voc-image-not-found": ("voc", lambda p: replace(p / "a.xml", "<filename>a.png", "<filename>zz.png"),
                            r"a\.xml: image 'zz\.png' not found", 2),
    "voc-bndbox-not-numbers": ("voc", lambda p: replace(p / "b.xml", "<xmin>20", "<xmin>twenty"),
                               r"b\.xml: object 1: <bndbox> needs numbers xmin, ymin, xmax, ymax", 3),
    "voc-object-without-name": ("voc", lambda p: replace(p / "b.xml", "<name>dog</name>", ""),
                                r"b\.xml: object 1: needs a <name> and a <bndbox>", 3),
    "voc-inverted-box": ("voc", lambda p: replace(p / "a.xml", "<xmin>2</xmin>", "<xmin>30</xmin>"),
                         r"a\.xml: object 1: degenerate box \(width -18", 3),
    "voc-annotated-twice": ("voc", lambda p: replace(p / "c.xml", "<filename>c.png", "<filename>a.png"),
                            r"c\.xml: image .*a\.png is annotated twice \(also by .*a\.xml\)", 2),
    "ls-no-image": ("labelstudio", lambda p: edit_json(p, lambda d: d[1]["data"].pop("image")),
                    r"export\.json: task 2: needs data\.image", 2),
    "ls-duplicate-task": ("labelstudio", lambda p: edit_json(p, lambda d: d[2].update(id=1)),
                          r"export\.json: task 1: duplicate task id", 2),
    "ls-image-not-found": ("labelstudio", lambda p: edit_json(p, lambda d: d[1]["data"].update(image="zz.png")),
                           r"export\.json: task 2: image 'zz\.png' not found", 2),
    "ls-two-labels": ("labelstudio",
                      lambda p: edit_json(p, lambda d: d[0]["annotations"][0]["result"][0]["value"].update(
                          rectanglelabels=["cat", "dog"])),
                      r"export\.json: task 1 result r0: needs exactly one name in value\.rectanglelabels", 3),
    "ls-value-missing-x": ("labelstudio",
                           lambda p: edit_json(p, lambda d: d[0]["annotations"][0]["result"][0]["value"].pop("x")),
                           r"export\.json: task 1 result r0: value needs numbers x, y, width, height", 3),
    "csv-not-a-number": ("box-csv", lambda p: replace(p, ",20,10,", ",twenty,10,"),
                         r"boxes\.csv:3: xmin, ymin, xmax, ymax must be numbers", 3),
    "csv-image-not-found": ("box-csv", lambda p: replace(p, "imgs/a.png", "imgs/zz.png"),
                            r"boxes\.csv:2: image .*zz\.png not found", 2),
    "csv-no-label": ("box-csv", lambda p: replace(p, ",cat\n", ",\n"),
                     r"boxes\.csv:2: a box without a label", 3),
    "csv-unknown-split": ("box-csv", lambda p: p.write_text(
        p.read_text().replace("label\n", "label,split\n").replace("\n", ",train\n").replace("split,train", "split")
        .replace("a.png,2,3,12,15,cat,train", "a.png,2,3,12,15,cat,holdout")),
        r"boxes\.csv:2: unknown split 'holdout' \(use train, val or test\)", 2),
    "csv-nan": ("box-csv", lambda p: replace(p, ",20,10,", ",nan,10,"), r"boxes\.csv:3: box has a NaN", 3),
}

# Spoiled files that cannot be read at all: an error with skip too.
FILE_CASES = {
    "coco-missing-categories": ("coco", lambda p: edit_json(p, lambda d: d.pop("categories")),
                                r"annotations\.json: 'categories' is missing"),
    "coco-images-not-a-list": ("coco", lambda p: edit_json(p, lambda d: d.update(images={})),
                               r"annotations\.json: 'images' is a dict, not a list"),
    "coco-invalid-json": ("coco", lambda p: p.write_text('{"images": ['), r"annotations\.json: not valid JSON"),
    "coco-duplicate-category": ("coco", lambda p: edit_json(p, lambda d: d["categories"][1].update(name="cat")),
                                r"annotations\.json: category name 'cat' is used by ids 1 and 2"),
    "yolo-names-wrong-type": ("yolo", lambda p: (p / "data.yaml").write_text("names: 3\n"),
                              r"data\.yaml: 'names' must be a non-empty list or a mapping"),
    "yolo-bad-yaml": ("yolo", lambda p: (p / "data.yaml").write_text("names: [cat, dog\n"),
                      r"data\.yaml: cannot be read as YAML"),
    "yolo-no-names": ("yolo", lambda p: (p / "data.yaml").unlink(), r"no class names for the YOLO labels"),
}


def spoiled(tmp_path: Path, formats, fmt: str, spoil: Callable[[Path], None]) -> Path:
    path = formats.build[fmt](tmp_path)
    spoil(path)
    return path


@pytest.mark.parametrize("case", LABEL_CASES)
def test_bad_label_fails_with_one_line_then_skips(tmp_path, formats, case):
    fmt, spoil, message, images_left = LABEL_CASES[case]
    path = spoiled(tmp_path, formats, fmt, spoil)
    with pytest.raises(DataError) as caught:
        open_source(path)
    text = str(caught.value)
    assert "\n" not in text and text.endswith(SKIP_HINT)
    assert re.fullmatch(r"\S*" + message + ".*", text.removesuffix(SKIP_HINT)), text
    source = open_source(path, on_bad_label="skip")
    reasons = [p["reason"] for p in source.problems if "not annotated" not in p["reason"]]
    assert len(reasons) == 1 and re.fullmatch(r"\S*" + message + ".*", reasons[0]), reasons
    assert len(source.records) == images_left


@pytest.mark.parametrize("case", FILE_CASES)
def test_unreadable_file_fails_even_with_skip(tmp_path, formats, case):
    fmt, spoil, message = FILE_CASES[case]
    path = spoiled(tmp_path, formats, fmt, spoil)
    for policy in ("fail", "skip"):
        with pytest.raises(DataError) as caught:
            open_source(path, on_bad_label=policy)
        assert "\n" not in str(caught.value) and re.search(message, str(caught.value)), str(caught.value)


def test_skip_keeps_the_good_boxes_of_an_image(tmp_path, formats):
    path = formats.build["yolo"](tmp_path)
    with (path / "labels" / "b.txt").open("a") as f:
        f.write("0 0.5 0.5 0 0.2\n")  # a third, zero-width box on line 3
    source = open_source(path, on_bad_label="skip")
    assert [p["origin"] for p in source.problems] == [f"{path / 'labels' / 'b.txt'}:3"]
    assert len(source.records) == 3 and source.records[1].target.labels.tolist() == [1, 0]


def test_boxes_partly_outside_are_clipped_silently(tmp_path, formats):
    path = formats.build["coco"](tmp_path)
    edit_json(path, lambda d: coco_ann(d, 1, bbox=[30, -5, 20, 20]))
    source = open_source(path)
    assert source.problems == [] and source.records[1].target.boxes[0].tolist() == [30, 0, 40, 15]


def test_every_image_bad_is_an_error_even_with_skip(tmp_path, formats):
    path = formats.build["box-csv"](tmp_path)
    path.write_text("path,xmin,ymin,xmax,ymax,label\nimgs/zz.png,1,1,5,5,cat\n")
    with pytest.raises(DataError, match=r"has no usable annotated images \(1 problems skipped\)"):
        open_source(path, on_bad_label="skip")


def test_split_folders_must_share_classes(tmp_path, formats):
    for split in ("train", "val"):
        formats.build["coco"](tmp_path / split)
    edit_json(tmp_path / "val" / "annotations.json", lambda d: d["categories"][1].update(name="fox"))
    with pytest.raises(DataError, match=r"lists the classes \['cat', 'fox'\] but .* lists \['cat', 'dog'\]"):
        open_source(tmp_path)


def test_layout_errors_name_the_folder(tmp_path, formats):
    formats.build["yolo"](tmp_path / "mixed" / "train")
    formats.build["coco"](tmp_path / "mixed" / "val")
    with pytest.raises(DataError, match=r"mixed: the split folders use different formats \(train: yolo, val: coco\)"):
        open_source(tmp_path / "mixed")
    path = formats.build["coco"](tmp_path / "two")
    (path.parent / "instances_val.json").write_text(path.read_text())
    with pytest.raises(DataError, match=r"two: several COCO files \(annotations\.json, instances_val\.json\)"):
        open_source(tmp_path / "two")
    (tmp_path / "x.json").write_text('"just a string"')
    with pytest.raises(DataError, match=r"x\.json: neither a COCO file \(an object\) nor a Label Studio export"):
        open_source(tmp_path / "x.json")
