"""EXIF orientation: boxes end up where the decoder puts the pixels they were drawn on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lensforge.data import open_source
from lensforge.data.decode import decode_image
from lensforge.data.detection.common import ImageInfo, display_to_stored, probe_image, stored_to_display

STORED_SIZE = (40, 30)  # width, height of the pixels as stored in the file
STORED_BOX = (5, 2, 15, 8)  # a white rectangle on the stored pixels


def write_oriented(path: Path, orientation: int, suffix_format: str = "PNG") -> Path:
    """A black image with a white rectangle at STORED_BOX, tagged with an EXIF orientation."""
    pixels = np.zeros((STORED_SIZE[1], STORED_SIZE[0], 3), dtype=np.uint8)
    x1, y1, x2, y2 = STORED_BOX
    pixels[y1:y2, x1:x2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, format=suffix_format, exif=exif.tobytes(), quality=100)
    return path


def decoded_white_box(path: Path) -> list[float]:
    """Where the rectangle is after decoding (EXIF applied), as a pixel-edge box."""
    pixels = np.asarray(decode_image(path, mode="L")) > 128
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_box_transform_matches_the_decoder(tmp_path, orientation):
    path = write_oriented(tmp_path / "x.png", orientation)
    info = probe_image(path)
    assert info == ImageInfo(STORED_SIZE, orientation)
    display = stored_to_display(np.array([STORED_BOX]), info)
    assert display[0].tolist() == decoded_white_box(path)
    np.testing.assert_allclose(display_to_stored(display, info), [STORED_BOX])


def test_jpeg_orientation_is_read_from_the_header(tmp_path):
    path = write_oriented(tmp_path / "x.jpg", 6, "JPEG")
    assert probe_image(path) == ImageInfo(STORED_SIZE, 6)
    assert probe_image(tmp_path / "missing.jpg") == f"image {tmp_path / 'missing.jpg'} not found"


def write_voc(folder: Path, size: tuple[int, int] | None) -> None:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height></size>" if size else ""
    box = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), STORED_BOX))
    (folder / "x.xml").write_text(f"<annotation><filename>x.jpg</filename>{size_xml}<object><name>cat</name>"
                                  f"<bndbox>{box}</bndbox></object></annotation>")


@pytest.mark.parametrize("size", [None, STORED_SIZE], ids=["no-size", "stored-size"])
def test_voc_boxes_on_stored_pixels_are_rotated(tmp_path, size):
    path = write_oriented(tmp_path / "x.jpg", 6, "JPEG")  # a phone photo, portrait
    write_voc(tmp_path, size)
    target = open_source(tmp_path).records[0].target
    assert target.boxes[0].tolist() == decoded_white_box(path) == [22, 5, 28, 15]


def test_voc_size_of_the_rotated_image_means_no_rotation(tmp_path):
    write_oriented(tmp_path / "x.jpg", 6, "JPEG")
    write_voc(tmp_path, STORED_SIZE[::-1])  # the annotator saw the rotated 30x40 image
    assert open_source(tmp_path).records[0].target.boxes[0].tolist() == list(STORED_BOX)


def test_yolo_boxes_are_on_the_rotated_image(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    path = write_oriented(tmp_path / "images" / "x.png", 6)
    x1, y1, x2, y2 = decoded_white_box(path)
    width, height = STORED_SIZE[::-1]
    (tmp_path / "labels" / "x.txt").write_text(
        f"0 {(x1 + x2) / 2 / width} {(y1 + y2) / 2 / height} {(x2 - x1) / width} {(y2 - y1) / height}\n")
    (tmp_path / "data.yaml").write_text("names: [cat]\n")
    np.testing.assert_allclose(open_source(tmp_path).records[0].target.boxes, [[x1, y1, x2, y2]], atol=1e-4)


@pytest.mark.parametrize("recorded, expected", [(STORED_SIZE, [22, 5, 28, 15]), (STORED_SIZE[::-1], list(STORED_BOX))],
                         ids=["stored-size", "rotated-size"])
def test_coco_frame_from_recorded_size(tmp_path, recorded, expected):
    write_oriented(tmp_path / "x.png", 6)
    x1, y1, x2, y2 = STORED_BOX
    coco = {"images": [{"id": 1, "file_name": "x.png", "width": recorded[0], "height": recorded[1]}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]}],
            "categories": [{"id": 1, "name": "cat"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    assert open_source(tmp_path).records[0].target.boxes[0].tolist() == expected
