from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tree_digest, write_image_folder
from PIL import Image

from lensforge.data import load_table, make_splits, open_source
from lensforge.data.decode import decode_image
from lensforge.data.preprocess import Preprocess
from lensforge.errors import DataError, UsageError

RGB16 = Preprocess(input_size=(16, 16), channels=3)


def test_digits_is_real_sklearn_data():
    source = open_source("builtin:digits")
    assert len(source.records) == 1797 and source.class_names == [str(d) for d in range(10)]
    assert source.color_mode == "L" and source.native_size == (8, 8)
    table = load_table(source, Preprocess((8, 8), 1, (0.5,), (0.5,)))
    assert table.images.shape == (1797, 1, 8, 8) and table.images.max() == 255
    assert np.bincount(table.targets).min() > 170


def test_shapes_source_options_and_domain():
    a = open_source("builtin:shapes?n=60&size=16&seed=3")
    b = open_source("builtin:shapes", n=60, size=16, seed=3, domain="shifted")
    assert len(a.records) == 60 and a.arrays.shape == (60, 16, 16, 3)
    assert a.arrays.mean() > b.arrays.mean()  # the shifted domain is darker
    assert "seed=3" in a.spec and open_source(a.spec).arrays.tobytes() == a.arrays.tobytes()
    with pytest.raises(UsageError, match="unknown option"):
        open_source("builtin:shapes?colour=red")
    with pytest.raises(UsageError, match="out of range"):
        open_source("builtin:shapes?size=3")


def test_unknown_builtin_suggests():
    with pytest.raises(UsageError, match="did you mean builtin:digits"):
        open_source("builtin:digit")


def test_folder_source_and_fixed_splits(tmp_path):
    root = tmp_path / "split"
    for split in ("train", "val", "test"):
        write_image_folder(root, per_class=4, split=split)
    source = open_source(root)
    assert source.class_names == ["cat", "dog"] and len(source.records) == 24
    table = load_table(source, RGB16)
    splits = make_splits(table)
    assert splits.how == "given" and len(splits.train) == len(splits.val) == len(splits.test) == 8


def test_manifest_csv_and_jsonl(tmp_path, image_folder):
    files = sorted(image_folder.rglob("*.png"))
    rows = [(str(p.relative_to(image_folder)), p.parent.name) for p in files]
    csv_path = image_folder / "data.csv"
    csv_path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    jsonl_path = image_folder / "data.jsonl"
    jsonl_path.write_text("".join(json.dumps({"path": p, "label": label, "split": "train" if i % 2 else "test"}) + "\n"
                                  for i, (p, label) in enumerate(rows)))
    assert len(load_table(open_source(csv_path), RGB16)) == len(files)
    assert {r.split for r in open_source(jsonl_path).records} == {"train", "test"}


@pytest.mark.parametrize("content, message", [
    ("file,label\na.png,x\n", "lacks column"),
    ("path,label\n", "no rows"),
])
def test_bad_manifest(tmp_path, content, message):
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        open_source(path)


def test_manifest_unknown_path_names_it(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,label\nmissing.png,a\nalso.png,b\n")
    with pytest.raises(DataError, match="missing.png: cannot read"):
        load_table(open_source(path), RGB16)


def _bad_files(folder: Path) -> dict[str, bytes]:
    good = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(good, format="JPEG")
    return {"zero.png": b"", "trunc.jpg": good.getvalue()[:60], "text.png": b"hello, not an image",
            "notes.txt": b"just notes"}


def test_bad_images_fail_or_skip_by_path(image_folder):
    for name, blob in _bad_files(image_folder).items():
        (image_folder / "cat" / name).write_bytes(blob)
    source = open_source(image_folder)
    with pytest.raises(DataError, match=r"cat/(notes.txt|text.png|trunc.jpg|zero.png)"):
        load_table(source, RGB16)
    table = load_table(source, RGB16, on_bad_image="skip")
    assert len(table) == 12
    reasons = {Path(s["origin"]).name: s["reason"] for s in table.skipped}
    assert set(reasons) == {"zero.png", "trunc.jpg", "text.png", "notes.txt"}
    assert "empty file" in reasons["zero.png"] and "not an image file" in reasons["notes.txt"]
    assert "truncated" in reasons["trunc.jpg"] and "not an image" in reasons["text.png"]


def test_mixed_modes_convert(tmp_path):
    folder = tmp_path / "modes" / "a"
    folder.mkdir(parents=True)
    Image.new("RGBA", (9, 7), (255, 0, 0, 128)).save(folder / "rgba.png")
    Image.new("P", (9, 7)).save(folder / "pal.png")
    Image.new("CMYK", (9, 7), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((7, 9), 60000, dtype=np.uint16)).save(folder / "deep.png")
    Image.new("L", (9, 7), 30).save(folder / "grey.png")
    Image.new("1", (9, 7), 1).save(folder / "bw.bmp")
    for pre in (RGB16, Preprocess((16, 16), 1, (0.5,), (0.5,))):
        table = load_table(open_source(tmp_path / "modes"), pre)
        assert table.images.shape == (6, pre.channels, 16, 16) and table.images.dtype == np.uint8
    deep = decode_image(folder / "deep.png", mode="L")
    assert np.asarray(deep).min() > 200  # 16-bit scaled, not clipped to 255 garbage


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (30, 10), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert decode_image(path).size == (10, 30)


def test_decompression_bomb_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (4000, 4000)).save(path)
    with pytest.raises(DataError, match="decompression bomb"):
        decode_image(path, max_pixels=1_000_000)


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no class sub-folders"),
    (lambda p: (p / "a").mkdir() or p, "contains no files"),
    (lambda p: p / "nope", "does not exist"),
])
def test_empty_or_missing_folder(tmp_path, make, message):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError, match=message):
        open_source(make(root))


def test_single_image_class_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "one", per_class=5)
    for p in list((root / "dog").iterdir())[1:]:
        p.unlink()
    with pytest.raises(DataError, match="class 'dog' has a single image"):
        make_splits(load_table(open_source(root), RGB16))


def test_source_data_never_modified(image_folder):
    before = tree_digest(image_folder)
    table = load_table(open_source(image_folder), RGB16)
    make_splits(table)
    assert tree_digest(image_folder) == before
