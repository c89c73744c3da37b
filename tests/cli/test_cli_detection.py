"""Detection through the console script: data convert, list models --task detect, evaluate, report."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import run, tree_digest
from PIL import Image

SMALL_SPEC = "builtin:shapes?task=detect&n=6&size=64"
LAYOUTS = {  # what each format's folder holds
    "coco": ("annotations.json", "images"),
    "yolo": ("data.yaml", "images", "labels"),
    "voc": ("Annotations", "JPEGImages"),
}


def _coco_boxes(folder: Path) -> dict[str, list[tuple[str, list[float]]]]:
    """Per image file: its (class name, xywh box) pairs, sorted."""
    coco = json.loads((folder / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {image["id"]: image["file_name"] for image in coco["images"]}
    boxes: dict[str, list[tuple[str, list[float]]]] = {name: [] for name in files.values()}
    for a in coco["annotations"]:
        boxes[files[a["image_id"]]].append((names[a["category_id"]], a["bbox"]))
    return {name: sorted(pairs) for name, pairs in boxes.items()}


def _assert_one_line_error(result, *words: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr


# ---------------------------------------------------------------------------- data convert


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], dict[str, str]]:
    """builtin -> coco -> yolo -> voc -> coco2 through the CLI: (root, stdout per step, source digest before)."""
    root = tmp_path_factory.mktemp("convert")
    steps = [(SMALL_SPEC, "coco", "coco"), ("coco", "yolo", "yolo"), ("yolo", "voc", "voc"), ("voc", "coco2", "coco")]
    printed, digests = {}, {}
    for source, out, fmt in steps:
        src = source if source.startswith("builtin:") else str(root / source)
        if not source.startswith("builtin:"):
            digests[source] = tree_digest(root / source)
        result = run("data", "convert", src, str(root / out), "--to", fmt)
        assert result.returncode == 0, result.stderr
        printed[out] = result.stdout
    return root, printed, digests


def test_convert_through_every_format_keeps_images_and_boxes(converted):
    root, printed, digests = converted
    for out, fmt in (("coco", "coco"), ("yolo", "yolo"), ("voc", "voc"), ("coco2", "coco")):
        assert all((root / out / name).exists() for name in LAYOUTS[fmt]), out
        assert "6 images" in printed[out] and "22 boxes" in printed[out] and "6 classes" in printed[out]
    for source, digest in digests.items():
        assert tree_digest(root / source) == digest, f"{source} was changed by converting it"
    first, last = _coco_boxes(root / "coco"), _coco_boxes(root / "coco2")
    assert list(first) == list(last) and sum(map(len, first.values())) == 22
    for name in first:
        assert [c for c, _ in first[name]] == [c for c, _ in last[name]]
        # VOC stores whole pixels: each edge moves by at most half a pixel, a width by at most one
        np.testing.assert_allclose([b for _, b in last[name]], [b for _, b in first[name]], atol=1.0)
        pixels = [np.asarray(Image.open(root / folder / "images" / name)) for folder in ("coco", "coco2")]
        assert np.array_equal(*pixels)  # the images travel unchanged


def test_convert_into_a_non_empty_folder_is_a_one_line_exit_2(converted):
    root, _, _ = converted
    before = {name: tree_digest(root / name) for name in ("coco", "yolo")}
    result = run("data", "convert", str(root / "coco"), str(root / "yolo"), "--to", "yolo")
    _assert_one_line_error(result, "not empty")
    assert {name: tree_digest(root / name) for name in ("coco", "yolo")} == before
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no half-written staging folder left


def test_list_models_for_detection():
    detect = run("list", "models", "--task", "detect")
    assert detect.returncode == 0, detect.stderr
    assert "fcos_tiny" in detect.stdout.split()


# ---------------------------------------------------------------------------- evaluate, report


@pytest.fixture(scope="module")
def evaluated(detection_run_template: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the session's detection run, its bundle evaluated on the test split through the CLI."""
    run_dir = Path(shutil.copytree(detection_run_template, tmp_path_factory.mktemp("cli-detect") / "run"))
    return run_dir, run("evaluate", str(run_dir / "bundle"))


def test_evaluate_prints_map(evaluated):
    run_dir, result = evaluated
    assert result.returncode == 0, result.stderr
    saved = json.loads((run_dir / "eval" / "test.json").read_text())
    match = re.search(r"(\d+) images, (\d+) objects: mAP@\[\.5:\.95\] ([0-9.]+)\s+mAP50 ([0-9.]+)", result.stdout)
    assert match, result.stdout
    assert (int(match[1]), int(match[2])) == (saved["images"], saved["objects"])
    assert float(match[3]) == pytest.approx(saved["map"], abs=5e-4)
    assert float(match[4]) == pytest.approx(saved["map50"], abs=5e-4)
    assert "precision" in result.stdout and "recall" in result.stdout


def test_evaluate_other_data_with_split_all(evaluated, converted):
    run_dir, _ = evaluated
    root, _, _ = converted
    result = run("evaluate", str(run_dir / "bundle"), "--data", str(root / "voc"), "--split", "all")
    assert result.returncode == 0, result.stderr
    assert "6 images, 22 objects: mAP@[.5:.95]" in result.stdout
    assert json.loads((run_dir / "eval" / "all.json").read_text())["images"] == 6


def test_report_shows_the_detection_evaluation(evaluated):
    run_dir, result = evaluated
    assert result.returncode == 0, result.stderr
    done = run("report", str(run_dir))
    assert done.returncode == 0, done.stderr
    html = (run_dir / "report.html").read_text()
    assert "mAP@[.5:.95]" in html and "mAP50" in html
    images = re.findall(r"<img[^>]+src=\"([^\"]+)\"", html)
    assert any(src.startswith("data:image/png;base64,") for src in images), images[:3]
    assert "Precision-recall curves per class" in html  # the PR curves evaluate drew
