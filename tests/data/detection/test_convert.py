"""convert_boxes: round trips within a pixel, self-contained and atomic output, read back by globox too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tree_digest, write_image_folder

from lensforge.data import open_source
from lensforge.data.convert import convert_boxes
from lensforge.data.decode import decode_image
from lensforge.data.detection import writers
from lensforge.errors import DataError, UsageError

FRACTIONAL = {1: [2.3, 3.6, 9.8, 11.45], 2: [20.2, 10.7, 17.55, 17.1], 3: [5.5, 5.25, 9.9, 19.65]}


def fractional_coco(tmp_path: Path, formats) -> Path:
    path = formats.build["coco"](tmp_path / "src")
    data = json.loads(path.read_text())
    for annotation in data["annotations"]:
        annotation["bbox"] = FRACTIONAL[annotation["id"]]
    path.write_text(json.dumps(data))
    return path


def targets(spec) -> dict[str, tuple[np.ndarray, list[int]]]:
    return {Path(r.origin).name: (r.target.boxes, r.target.labels.tolist()) for r in open_source(spec).records}


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name][0], b[name][0], atol=atol)
        assert a[name][1] == b[name][1]


def test_round_trip_coco_yolo_voc_coco_within_a_pixel(tmp_path, formats):
    src = fractional_coco(tmp_path, formats)
    digest = tree_digest(src.parent)
    original = targets(src)
    previous = src
    for step, fmt in enumerate(("yolo", "voc", "coco")):
        out = tmp_path / f"{step}-{fmt}"
        counts = convert_boxes(str(previous), fmt, out)
        assert counts == {"format": fmt, "out": str(out), "images": 3, "boxes": 3, "negatives": 1, "classes": 2,
                          "splits": {}, "skipped": 0, "problems": []}
        assert open_source(out).class_names == formats.classes
        assert_same(original, targets(out), atol=1.0)
        previous = out
    assert tree_digest(src.parent) == digest  # the source is only read
    for name in ("a.png", "b.png", "c.png"):  # images copied byte for byte
        assert (previous / "images" / name).read_bytes() == (src.parent / "images" / name).read_bytes()


@pytest.mark.parametrize("fmt", ["coco", "yolo", "labelstudio"])
def test_exact_formats_round_trip_to_float_precision(tmp_path, formats, fmt):
    src = fractional_coco(tmp_path, formats)
    convert_boxes(str(src), fmt, tmp_path / "out")
    assert_same(targets(src), targets(tmp_path / "out"), atol=1e-3)


def test_globox_reads_what_we_write(tmp_path, formats):
    import globox

    src = fractional_coco(tmp_path, formats)
    for fmt in ("coco", "yolo", "voc"):
        convert_boxes(str(src), fmt, tmp_path / fmt)
    sets = {"coco": globox.AnnotationSet.from_coco(tmp_path / "coco" / "annotations.json"),
            "yolo": globox.AnnotationSet.from_yolo_darknet(tmp_path / "yolo" / "labels",
                                                           image_folder=tmp_path / "yolo" / "images",
                                                           image_extension=".png"),
            "voc": globox.AnnotationSet.from_pascal_voc(tmp_path / "voc" / "Annotations")}
    expected = targets(src)
    for fmt, annotation_set in sets.items():
        boxes = {Path(a.image_id).stem: sorted(b.ltrb for b in a.boxes) for a in annotation_set}
        if fmt == "yolo":  # globox names YOLO classes by id
            labels = {Path(a.image_id).stem: sorted(b.label for b in a.boxes) for a in annotation_set}
            assert labels["b"] == ["0", "1"]
        for name, (want, _) in expected.items():
            np.testing.assert_allclose(np.array(boxes.get(Path(name).stem, [])).reshape(-1, 4),
                                       np.array(sorted(map(tuple, want.tolist()))).reshape(-1, 4), atol=1.0)


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc", "labelstudio"])
def test_splits_are_kept(tmp_path, formats, fmt):
    for split in ("train", "val", "test"):
        formats.build["yolo"](tmp_path / "src" / split)
    counts = convert_boxes(str(tmp_path / "src"), fmt, tmp_path / "out")
    assert counts["splits"] == {"train": 3, "val": 3, "test": 3}
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["test", "train", "val"]
    source = open_source(tmp_path / "out")
    assert [r.split for r in source.records] == ["train"] * 3 + ["val"] * 3 + ["test"] * 3
    if fmt == "yolo":
        assert "train: \"train/images\"" in (tmp_path / "out" / "data.yaml").read_text()


def test_builtin_shapes_are_written_as_png(tmp_path):
    spec = "builtin:shapes?task=detect&n=12&size=48&seed=4"
    counts = convert_boxes(spec, "coco", tmp_path / "out")
    assert counts["images"] == 12 and counts["classes"] == 6
    source, written = open_source(spec), open_source(tmp_path / "out")
    for record, copy in zip(source.records, written.records):
        assert np.array_equal(np.asarray(decode_image(copy.origin)), source.arrays[record.index])
        np.testing.assert_allclose(copy.target.boxes, record.target.boxes, atol=1e-3)
        assert np.array_equal(copy.target.labels, record.target.labels)


def test_exif_oriented_images_keep_their_boxes(tmp_path, formats):
    src = tmp_path / "src"
    formats.write_image(src / "x.jpg", seed=1, orientation=6)
    (src / "x.xml").write_text(formats.voc_xml("x.jpg", [("cat", (5, 2, 15, 8))]))  # on the stored pixels
    expected = targets(src)
    assert expected["x.jpg"][0].tolist() == [[22, 5, 28, 15]]
    for fmt in ("coco", "yolo", "voc", "labelstudio"):
        convert_boxes(str(src), fmt, tmp_path / fmt)
        assert_same(expected, targets(tmp_path / fmt), atol=1e-3)
    assert "<xmin>5</xmin>" in (tmp_path / "voc" / "Annotations" / "x.xml").read_text()  # stored pixels again


def test_refusals_are_one_line_usage_errors(tmp_path, formats):
    src = formats.build["coco"](tmp_path / "src")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"^output folder '.*full' is not empty: give a new or empty folder$"):
        convert_boxes(str(src), "yolo", tmp_path / "full")
    with pytest.raises(UsageError, match="unknown label format 'yollo'; did you mean yolo"):
        convert_boxes(str(src), "yollo", tmp_path / "new")
    with pytest.raises(UsageError, match="is classification data: only detection data"):
        convert_boxes(str(write_image_folder(tmp_path / "cls")), "coco", tmp_path / "new")
    (tmp_path / "empty").mkdir()
    convert_boxes(str(src), "voc", tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "Annotations" / "b.xml").is_file()


def test_bad_labels_fail_or_are_skipped_and_reported(tmp_path, formats):
    src = formats.build["yolo"](tmp_path / "src")
    (src / "labels" / "a.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError, match=r"a\.txt:1: class id 7 is not in the 2 names"):
        convert_boxes(str(src), "coco", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    counts = convert_boxes(str(src), "coco", tmp_path / "out", on_bad_label="skip")
    assert counts["skipped"] == 1 and counts["problems"][0]["origin"].endswith("a.txt:1")
    assert counts["boxes"] == 2 and counts["negatives"] == 2


def test_a_failed_conversion_leaves_nothing(tmp_path, formats, monkeypatch):
    src = formats.build["voc"](tmp_path / "src")

    def broken(images, folder):
        raise OSError("disk full")

    monkeypatch.setattr(writers, "place_images", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_boxes(str(src), "coco", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
