"""stress() on a detection bundle: mAP under the quick suite, box stability, and targets that move.

A copy of the session's tiny fcos_tiny run (stress writes RUN/stress). The model detects
little, so the summary's shape and arithmetic are checked, not its robustness.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lensforge.data.preprocess import letterbox_scale
from lensforge.ops.corruptions import suite_plan
from lensforge.ops.corruptions.boxes import corrupt_with_boxes, moves_boxes
from lensforge.ops.corruptions.geometry import ROTATION_DEG
from lensforge.stress.detection import _corrupted_targets
from lensforge.stress.suite import StressConfig, stress
from lensforge.tasks.detection import BoxTarget

STABILITY_KEYS = {"shifts_px", "score_threshold", "changed_per_clean_detection", "mean_matched_iou",
                  "clean_detections"}


@pytest.fixture(scope="module")
def stressed(eager_detection_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The bundle of a copy of the run, stressed with the quick suite on 20 test images: (run, corruptions.json).

    The copy shows detections on every image (conftest.make_eager), so box stability is measured on boxes.
    """
    run_dir = Path(shutil.copytree(eager_detection_run_template, tmp_path_factory.mktemp("detect-stress") / "run"))
    result = stress(run_dir / "bundle", cfg=StressConfig(suite="quick", max_images=20, stability=True),
                    show_progress=False)
    assert result.path == run_dir / "stress" / "corruptions.json"
    return run_dir, json.loads(result.path.read_text())


def test_corruptions_json_has_map_per_corruption_and_severity(stressed):
    _, summary = stressed
    assert summary["task"] == "detection" and summary["kind"] == "bundle" and summary["metric"] == "map"
    assert summary["num_images"] == 20 and summary["suite"] == "quick"
    assert summary["compare"] == []  # the run has no int8 variant
    plan = suite_plan("quick")
    assert summary["severities"] == sorted({severity for _, severity in plan})
    assert set(summary["clean"]) == {"map", "map50"}
    assert 0 <= summary["clean"]["map"] <= summary["clean"]["map50"] <= 1
    assert set(summary["corruptions"]) == {name for name, _ in plan}
    for name, severity in plan:
        entry = summary["corruptions"][name]
        assert 0 <= entry["map"][str(severity)] <= 1 and 0 <= entry["map50"][str(severity)] <= 1
        assert entry["mean_map"] == pytest.approx(np.mean(list(entry["map"].values())))
    errors = [1 - summary["corruptions"][name]["map"][str(severity)] for name, severity in plan]
    assert summary["mean_corruption_error"] == pytest.approx(np.mean(errors))
    assert summary["mean_drop"] == pytest.approx(summary["clean"]["map"] - (1 - np.mean(errors)))


def test_stability_is_measured_on_real_detections(stressed):
    _, summary = stressed
    stability = summary["stability"]
    assert STABILITY_KEYS <= set(stability)
    assert stability["clean_detections"] > 0
    assert stability["changed_per_clean_detection"] >= 0
    assert 0.5 <= stability["mean_matched_iou"] <= 1  # pairs are matched at IoU >= 0.5
    assert len(stability["shifts_px"]) >= 1 and all(len(shift) == 2 for shift in stability["shifts_px"])


# ---------------------------------------------------------------------------- targets under corruptions

SIZES = [(128, 80), (64, 64)]  # a wide image letterboxed into 64x64 (scale 0.5, padded below), a square one
TARGETS = [BoxTarget([[44, 34, 84, 66], [50, 60, 90, 79]], [0, 2]), BoxTarget([[20, 20, 40, 44]], [1])]


def _through(name: str, severity: int, *, clip: bool = True) -> tuple[list[BoxTarget], list[np.ndarray], list[float]]:
    scales = [letterbox_scale(size, (64, 64)) for size in SIZES]
    images = torch.zeros(len(SIZES), 3, 64, 64, dtype=torch.uint8)
    _, moved, kept = corrupt_with_boxes(images, [t.boxes * s for t, s in zip(TARGETS, scales)], name, severity)
    return _corrupted_targets(TARGETS, moved, kept, scales, SIZES if clip else None), kept, scales


def test_a_photometric_corruption_leaves_the_targets_where_they_were():
    assert not moves_boxes("gaussian_noise")
    targets, kept, _ = _through("gaussian_noise", 3)
    for before, after, keep in zip(TARGETS, targets, kept):
        assert keep.all()
        np.testing.assert_allclose(after.boxes, before.boxes, atol=1e-4)  # to input pixels and back
        assert np.array_equal(after.labels, before.labels)


def test_a_rotation_moves_the_targets_about_the_input_centre():
    assert moves_boxes("rotation")
    angle = np.radians(ROTATION_DEG[2])
    targets, kept, scales = _through("rotation", 3, clip=False)  # the geometry alone, before clipping to the image
    centre = np.array([32.0, 32.0])  # of the 64x64 input, where the rotation turns
    for before, after, keep, scale in zip(TARGETS, targets, kept, scales):
        assert keep.all() and np.array_equal(after.labels, before.labels[keep])
        assert np.abs(after.boxes - before.boxes).max() > 1  # the boxes moved
        for old, new in zip(before.boxes * scale, after.boxes * scale):  # in input pixels
            old_centre, new_centre = (old[:2] + old[2:]) / 2, (new[:2] + new[2:]) / 2
            # turning about the centre keeps a box's distance to it; its bounding box grows by the angle
            assert np.linalg.norm(new_centre - centre) == pytest.approx(np.linalg.norm(old_centre - centre), abs=0.05)
            width, height = old[2:] - old[:2]
            grown = [width * np.cos(angle) + height * np.sin(angle), width * np.sin(angle) + height * np.cos(angle)]
            np.testing.assert_allclose(new[2:] - new[:2], grown, atol=0.05)


def test_moved_targets_stay_inside_each_image():
    targets, _, _ = _through("rotation", 3)
    for target, (width, height) in zip(targets, SIZES):
        x1, y1, x2, y2 = target.boxes.T
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (y2 <= height).all(), target.boxes
