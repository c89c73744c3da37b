"""A detection run's bundle: its manifest, predict on files of any size, ONNX by hand, no torch, the CLI.

Uses the session's tiny fcos_tiny run (``detection_run_template``, read-only here: nothing
below writes into it). It detects little, so these tests check formats, geometry and
agreement between the paths that produce rows, never accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import run
from PIL import Image

from lensforge.data.convert import convert_boxes
from lensforge.data.decode import decode_image
from lensforge.data.preprocess import letterbox_scale, resize_to_input
from lensforge.deploy import load_bundle, predict_files
from lensforge.tasks.detection import DetectionHead, detection_row, postprocess

SMALL_SPEC = "builtin:shapes?task=detect&n=6&size=64"
OUTPUT_NAMES = ["cls_logits", "box_ltrb", "centerness", "features"]


@pytest.fixture(scope="module")
def bundle_path(eager_detection_run_template: Path) -> Path:
    return eager_detection_run_template / "bundle"  # every image has detections: see conftest.make_eager


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 64 px shapes images with their boxes, as a Pascal VOC folder."""
    root = tmp_path_factory.mktemp("detect-voc") / "voc"
    convert_boxes(SMALL_SPEC, "voc", root)
    return root


@pytest.fixture(scope="module")
def odd_sizes(voc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The VOC images stretched to other sizes and aspect ratios (wide, tall, tiny, large; PNG and JPEG)."""
    folder = tmp_path_factory.mktemp("detect-sizes")
    sizes = [(128, 80), (50, 90), (200, 120), (31, 47), (64, 64)]
    for i, (path, size) in enumerate(zip(sorted((voc / "JPEGImages").iterdir()), sizes)):
        image = Image.open(path).convert("RGB").resize(size, Image.BICUBIC)
        image.save(folder / f"{i}_{size[0]}x{size[1]}.{'jpg' if i == 2 else 'png'}")
    return folder


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


# ---------------------------------------------------------------------------- the manifest


def test_manifest_describes_a_detector(bundle_path, eager_detection_run_template):
    manifest = load_bundle(bundle_path).manifest
    assert manifest["task"] == "detection"
    assert manifest["preprocess"]["fit"] == "letterbox"
    head = DetectionHead.from_dict(manifest["detection"])
    assert head.to_dict() == manifest["detection"]  # every field of the head is stored
    assert 0 < head.score_threshold < 1 and 0 < head.nms_iou < 1 and head.max_detections >= 1
    run_info = json.loads((eager_detection_run_template / "run.json").read_text())
    unthresholded = {"score_threshold": None}  # the eager copy's threshold differs on purpose
    assert {**manifest["detection"], **unthresholded} == {**run_info["detection"], **unthresholded}
    outputs = {o["name"]: o["shape"] for o in manifest["outputs"]}
    assert list(outputs) == OUTPUT_NAMES
    classes = len(manifest["class_names"])
    assert manifest["num_classes"] == classes
    assert outputs["cls_logits"] == ["batch", head.num_points, classes]
    assert outputs["box_ltrb"] == ["batch", head.num_points, 4]
    assert outputs["centerness"] == ["batch", head.num_points]
    parity = manifest["parity"]
    assert parity["same_detections"] == 1.0
    assert parity["n_images"] > 0 and parity["detections"] > 0  # the agreement was over real boxes
    assert parity["max_abs_diff_cls_logits"] <= parity["atol"]


def test_parity_ignores_the_order_of_tied_scores():
    import torch

    from lensforge.tasks.torch_detection import DetectorExport

    head = DetectionHead(levels=((8, 8, 8), (16, 4, 4), (32, 2, 2)), score_threshold=0.3)
    points = head.num_points
    ours = {"cls_logits": np.zeros((1, points, 1), np.float32),  # every point scores 0.5: 84 tied boxes
            "box_ltrb": np.full((1, points, 4), 3.0, np.float32), "centerness": np.zeros((1, points), np.float32),
            "features": np.zeros((1, 8), np.float32)}
    noise = np.random.default_rng(0).normal(0, 1e-6, (1, points, 1)).astype(np.float32)
    theirs = {**ours, "cls_logits": ours["cls_logits"] + noise}  # what ONNX Runtime's rounding does
    result = DetectorExport(torch.nn.Identity(), head).parity(ours, theirs, atol=1e-3)
    assert result["same_detections"] == 1.0 and result["detections"] == points


# ---------------------------------------------------------------------------- predict_files


def test_rows_have_boxes_inside_each_image(bundle_path, voc, odd_sizes):
    bundle = load_bundle(bundle_path)
    threshold = bundle.manifest["detection"]["score_threshold"]
    rows = list(predict_files(bundle, [voc / "JPEGImages", odd_sizes], batch_size=4))
    assert len(rows) == 6 + 5
    for row in rows:
        width, height = _image_size(row["path"])
        assert row["count"] == len(row["detections"])
        scores = [d["score"] for d in row["detections"]]
        assert scores == sorted(scores, reverse=True)
        for d in row["detections"]:
            assert d["label"] == bundle.class_names[d["class_index"]]
            assert threshold - 1e-4 <= d["score"] <= 1
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (row["path"], d)
    assert sum(row["count"] for row in rows) > 0  # the checks above ran on real boxes
    wide = next(row for row in rows if row["path"].endswith("128x80.png"))
    assert max(d["box"][2] for d in wide["detections"]) > 64  # mapped back to 128 px, not left in input pixels


@pytest.mark.parametrize("small", [(64, 64), (64, 40)])
def test_twice_the_image_gives_twice_the_boxes(bundle_path, voc, tmp_path, small):
    """A 2x larger image letterboxes to exactly the pixels of the smaller one, so its boxes are 2x as large."""
    bundle = load_bundle(bundle_path)
    source = Image.open(sorted((voc / "JPEGImages").iterdir())[1]).convert("RGB")
    large = source.resize((2 * small[0], 2 * small[1]), Image.BICUBIC)
    model_input = resize_to_input(large, bundle.preprocess)  # (C, 64, 64): large letterboxed
    small_image = Image.fromarray(model_input[:, :small[1], :small[0]].transpose(1, 2, 0))
    large.save(tmp_path / "large.png")
    small_image.save(tmp_path / "small.png")
    assert np.array_equal(resize_to_input(small_image, bundle.preprocess), model_input)  # the premise
    by_name = {Path(row["path"]).stem: row for row in predict_files(bundle, tmp_path)}
    big, little = by_name["large"], by_name["small"]
    assert big["count"] == little["count"] > 0
    for a, b in zip(big["detections"], little["detections"]):
        assert (a["label"], a["score"]) == (b["label"], b["score"])
        assert a["box"] == pytest.approx([2 * v for v in b["box"]], abs=0.2)  # rounding to 0.1 px, twice


def test_rows_match_onnx_runtime_and_postprocess_by_hand(bundle_path, voc, odd_sizes):
    import onnxruntime as ort

    bundle = load_bundle(bundle_path)
    files = sorted((voc / "JPEGImages").iterdir()) + sorted(odd_sizes.iterdir())
    images = [decode_image(path, mode=bundle.preprocess.mode) for path in files]
    pixels = np.stack([resize_to_input(image, bundle.preprocess) for image in images])
    session = ort.InferenceSession(str(bundle_path / "model.onnx"), providers=["CPUExecutionProvider"])
    raw = dict(zip(OUTPUT_NAMES, session.run(OUTPUT_NAMES, {"input": pixels})))
    head = DetectionHead.from_dict(bundle.manifest["detection"])
    sizes = [image.size for image in images]
    found = postprocess(raw, head, scales=[letterbox_scale(s, bundle.preprocess.input_size) for s in sizes],
                        sizes=sizes)
    expected = [{"path": str(path), **detection_row(dets, bundle.class_names)} for path, dets in zip(files, found)]
    rows = list(predict_files(bundle, files, batch_size=len(files)))
    assert sum(row["count"] for row in expected) > 0
    assert rows == expected


# ---------------------------------------------------------------------------- no torch, the CLI


def test_predicting_detections_never_imports_torch(bundle_path, voc, odd_sizes):
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["torch"] = None  # any import of torch now fails
        from lensforge.deploy.predict import predict_files
        rows = list(predict_files({str(bundle_path)!r}, [{str(voc)!r}, {str(odd_sizes)!r}]))
        assert "torchvision" not in sys.modules and "timm" not in sys.modules
        print(json.dumps(rows))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows == list(predict_files(bundle_path, [voc, odd_sizes]))  # the same rows as with torch importable
    assert len(rows) == 11 and sum(row["count"] for row in rows) > 0


def test_cli_predict_prints_a_json_line_per_image_with_detections(bundle_path, voc, odd_sizes):
    files = [sorted((voc / "JPEGImages").iterdir())[0], odd_sizes / "0_128x80.png"]
    result = run("predict", str(bundle_path), *map(str, files))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["path"] for row in rows] == [str(f) for f in files]
    assert all("detections" in row and "label" not in row for row in rows)
    assert rows == list(predict_files(bundle_path, files))
