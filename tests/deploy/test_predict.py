"""predict_files on real image files: modes, batching, bad files, calibration, and no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lensforge.data.decode import decode_image
from lensforge.data.preprocess import normalize, resize_to_input
from lensforge.deploy import load_bundle, predict_files
from lensforge.errors import DataError
from lensforge.tasks.classification import softmax


@pytest.fixture
def image_folder(tmp_path, make_photo):
    """RGB PNG, grayscale JPEG, RGBA PNG and palette PNG (in a subfolder), plus a non-image."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    make_photo(rng, (40, 30)).save(folder / "a_rgb.png")
    make_photo(rng, (64, 48)).convert("L").save(folder / "b_gray.JPG", quality=90)
    rgba = make_photo(rng, (33, 33)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((33, 33)))
    rgba.save(folder / "c_rgba.png")
    make_photo(rng, (50, 70)).quantize(16).save(folder / "sub" / "d_palette.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _check_row(row, class_names, k):
    assert row["label"] in class_names
    assert row["label"] == class_names[row["class_index"]]
    probs = [entry["prob"] for entry in row["top_k"]]
    assert len(probs) == k and probs == sorted(probs, reverse=True)
    assert row["confidence"] == probs[0] and row["top_k"][0]["label"] == row["label"]


def test_one_row_per_image_with_probabilities(bundle, image_folder, class_names):
    rows = list(predict_files(load_bundle(bundle.path), image_folder, top_k=10, batch_size=3))
    names = [row["path"].removeprefix(str(image_folder) + "/") for row in rows]
    assert names == ["a_rgb.png", "b_gray.JPG", "c_rgba.png", "sub/d_palette.png"]
    for row in rows:
        _check_row(row, class_names, k=4)  # top_k is capped at the number of classes
        assert sum(entry["prob"] for entry in row["top_k"]) == pytest.approx(1.0, abs=1e-6)


def test_probabilities_match_the_pytorch_model(bundle, image_folder):
    rows = list(predict_files(bundle.path, image_folder, top_k=4, batch_size=1))
    pixels = np.stack([resize_to_input(decode_image(row["path"]), bundle.pre) for row in rows])
    with torch.inference_mode():
        logits = bundle.model(torch.from_numpy(normalize(pixels, bundle.pre))).numpy()
    expected = softmax(logits)
    for row, probs in zip(rows, expected):
        got = {entry["label"]: entry["prob"] for entry in row["top_k"]}
        assert [got[name] for name in load_bundle(bundle.path).class_names] == pytest.approx(
            probs, abs=1e-5
        )


def test_grayscale_bundle_reads_colour_files(exported_bundle, image_folder, class_names):
    gray = exported_bundle("resnet10t", 1, 32)
    rows = list(predict_files(gray.path, image_folder, top_k=2))
    assert len(rows) == 4
    for row in rows:
        _check_row(row, class_names, k=2)


def test_bad_image_skip_or_fail(bundle, image_folder, class_names):
    (image_folder / "b_zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = list(predict_files(bundle.path, image_folder, on_bad_image="skip", batch_size=2))
    assert len(rows) == 5
    broken = rows[2]  # rows keep the sorted file order, errors included
    assert broken["path"].endswith("b_zz_broken.png") and set(broken) == {"path", "error"}
    assert "b_zz_broken.png" in broken["error"]
    assert all(row["label"] in class_names for row in rows if "error" not in row)
    with pytest.raises(DataError, match="b_zz_broken.png"):
        list(predict_files(bundle.path, image_folder, on_bad_image="fail"))


def test_missing_path_raises_at_call(bundle, tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        predict_files(bundle.path, [tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        predict_files(bundle.path, tmp_path / "empty")


def test_temperature_softens_confidence(bundle, image_folder, tmp_path):
    hot = shutil.copytree(bundle.path, tmp_path / "hot")
    manifest = json.loads((hot / "manifest.json").read_text())
    manifest["temperature"] = 50.0
    (hot / "manifest.json").write_text(json.dumps(manifest))
    cold_rows = list(predict_files(bundle.path, image_folder))
    hot_rows = list(predict_files(hot, image_folder))
    for cold, warm in zip(cold_rows, hot_rows):
        assert warm["label"] == cold["label"]  # temperature never changes the ranking
        assert 0.25 <= warm["confidence"] < cold["confidence"]


def test_predicting_never_imports_torch(bundle, image_folder):
    script = textwrap.dedent(
        f"""
        import sys
        import lensforge.deploy.bundle
        import lensforge.deploy.predict
        bundle = lensforge.deploy.bundle.load_bundle({str(bundle.path)!r})
        rows = list(lensforge.deploy.predict.predict_files(bundle, {str(image_folder)!r}))
        assert len(rows) == 4, rows
        import lensforge.deploy
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ---------------------------------------------------------------------------- guardrails

GUARD_KEYS = {"ood", "ood_score", "quality", "abstain"}


@pytest.fixture(scope="module")
def guarded_bundle(bundle, images_for, class_names, tmp_path_factory):
    """A copy of the default bundle with guardrails fitted on 200 photo-like images."""
    from lensforge.data.table import ImageTable
    from lensforge.stress.ood import fit_guardrails

    images = images_for(bundle.pre, 200, seed=3)
    n = len(images)
    table = ImageTable(images, np.arange(n) % len(class_names), [f"photo#{i}" for i in range(n)],
                       [None] * n, list(class_names), "classification", bundle.pre)
    path = shutil.copytree(bundle.path, tmp_path_factory.mktemp("guarded") / "bundle")
    fit_guardrails(path, table, n_ood=24)
    return path


def test_rows_without_guardrails_are_unchanged(bundle, image_folder):
    for row in predict_files(bundle.path, image_folder):
        assert not GUARD_KEYS & set(row)


def test_guardrail_fields_on_every_row(guarded_bundle, image_folder, class_names, tmp_path):
    Image.fromarray(np.full((40, 40, 3), 3, np.uint8)).save(image_folder / "e_dark.png")
    Image.fromarray(np.full((5, 5, 3), 120, np.uint8)).save(image_folder / "f_tiny.png")
    rows = {Path(row["path"]).name: row for row in predict_files(guarded_bundle, image_folder, batch_size=4)}
    assert len(rows) == 6
    for row in rows.values():
        _check_row(row, class_names, k=4)
        assert GUARD_KEYS <= set(row)
        assert isinstance(row["ood"], bool) and isinstance(row["ood_score"], float)
        assert isinstance(row["abstain"], bool) and isinstance(row["quality"], list)
    assert "too_dark" in rows["e_dark.png"]["quality"] and "low_contrast" in rows["e_dark.png"]["quality"]
    assert "too_small" in rows["f_tiny.png"]["quality"]
    assert rows["d_palette.png"]["quality"] == []  # a normal 50x70 photo passes every check
    assert rows["a_rgb.png"]["quality"] == ["too_small"]  # 40x30: upscaled to the 32 px input
    threshold = load_bundle(guarded_bundle).manifest["guardrails"]["ood"]["threshold"]
    assert all(row["ood"] == (row["ood_score"] > threshold) for row in rows.values())


def test_predicting_with_guardrails_never_imports_torch(guarded_bundle, image_folder):
    script = textwrap.dedent(
        f"""
        import sys
        import lensforge.deploy.predict
        rows = list(lensforge.deploy.predict.predict_files({str(guarded_bundle)!r}, {str(image_folder)!r}))
        assert len(rows) == 4 and all({{"ood", "ood_score", "quality", "abstain"}} <= set(r) for r in rows), rows
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
