"""evaluate() of a detection run (PyTorch) and of its bundle (ONNX Runtime): COCO metrics, plots, other data.

A copy of the session's tiny fcos_tiny run per module (evaluate writes RUN/eval). The model
detects little (mAP near 0), so the checks are agreement, files and errors, not accuracy.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lensforge.data.convert import convert_boxes
from lensforge.errors import DataError, UsageError
from lensforge.evaluate import evaluate

SMALL_SPEC = "builtin:shapes?task=detect&n=6&size=64"
METRIC_KEYS = {"split", "evaluated", "data", "task", "images", "objects", "map", "map50", "map75", "mar100",
               "per_class_ap", "precision", "recall", "f1", "score_threshold", "iou", "confusion_matrix", "plots"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(detection_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(detection_run_template, tmp_path_factory.mktemp("detect-eval") / "run"))


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """SMALL_SPEC written as Pascal VOC, with what convert_boxes counted."""
    root = tmp_path_factory.mktemp("detect-eval-voc") / "voc"
    return root, convert_boxes(SMALL_SPEC, "voc", root)


@pytest.fixture(scope="module")
def both(run_dir: Path) -> dict[str, dict]:
    """The run's and its bundle's metrics on the run's test split (the bundle's are written last)."""
    return {"run": evaluate(run_dir, split="test").metrics,
            "bundle": evaluate(run_dir / "bundle", split="test").metrics}


def test_run_and_bundle_measure_the_same(both):
    run, bundle = both["run"], both["bundle"]
    assert (run["evaluated"], bundle["evaluated"]) == ("run", "bundle")
    assert run["task"] == bundle["task"] == "detection"
    assert run["images"] == bundle["images"] > 0 and run["objects"] == bundle["objects"] > 0
    for key in ("map", "map50", "mar100", "precision", "recall"):
        assert bundle[key] == pytest.approx(run[key], abs=1e-3), key
    assert run["mar100"] > 0  # something was found, so the agreement is over real detections


def test_eval_json_has_the_metrics_and_valid_pngs(both, run_dir):
    written = json.loads((run_dir / "eval" / "test.json").read_text())
    assert METRIC_KEYS <= set(written)
    assert written["evaluated"] == "bundle" and written["map"] == both["bundle"]["map"]
    assert 0 <= written["map"] <= written["map50"] <= 1
    classes = json.loads((run_dir / "run.json").read_text())["class_names"]
    assert list(written["per_class_ap"]) == classes
    assert len(written["confusion_matrix"]) == len(classes) + 1  # a background row
    assert set(written["plots"]) == {"pr_curves", "confusion_matrix", "worst_images"}
    for relative in written["plots"].values():
        path = run_dir / relative
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 50


def test_other_data_as_voc_with_split_all(run_dir, voc):
    root, counts = voc
    on_voc = evaluate(run_dir / "bundle", str(root), split="all").metrics
    assert on_voc["images"] == counts["images"] == 6 and on_voc["objects"] == counts["boxes"]
    assert (run_dir / "eval" / "all.json").exists()
    builtin = evaluate(run_dir / "bundle", SMALL_SPEC, split="all", write=False).metrics
    assert builtin["images"] == on_voc["images"] and builtin["objects"] == on_voc["objects"]
    assert builtin["recall"] == pytest.approx(on_voc["recall"], abs=0.05)  # VOC rounds boxes to whole pixels
    with pytest.raises(UsageError, match="--split all"):  # a plain folder has no test split of its own
        evaluate(run_dir / "bundle", str(root), split="test", write=False)


def test_a_class_the_model_does_not_know_is_a_one_line_data_error(run_dir, voc, tmp_path):
    root, _ = voc
    other = Path(shutil.copytree(root, tmp_path / "voc"))
    first = sorted((other / "Annotations").iterdir())[0]
    first.write_text(re.sub(r"<name>\w+</name>", "<name>zebra</name>", first.read_text(), count=1))
    with pytest.raises(DataError, match="zebra") as caught:
        evaluate(run_dir / "bundle", str(other), split="all", write=False)
    assert "\n" not in str(caught.value)
