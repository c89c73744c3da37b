"""examples/predict_onnxruntime.py: a torch-free, lensforge-free script gives `lensforge predict`'s answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lensforge.deploy.bundle import update_bundle
from lensforge.deploy.predict import predict_files

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "predict_onnxruntime.py"
# Runs the script once per (bundle, image) in one isolated interpreter where importing
# lensforge or torch fails, so a script that needed either could not print a line.
RUNNER = """
import contextlib, io, json, runpy, sys
for name in ("lensforge", "torch"):
    sys.modules[name] = None
script, cases = sys.argv[1], json.loads(sys.argv[2])
for bundle, image in cases:
    sys.argv = [script, bundle, image]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(script, run_name="__main__")
    label, score = out.getvalue().rstrip("\\n").split("\\t")
    print(json.dumps({"label": label, "score": float(score)}))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("lensforge", "torch") and sys.modules[m])))
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory, make_photo) -> list[Path]:
    """Photos of several sizes and shapes, one with transparency and one grey."""
    folder = tmp_path_factory.mktemp("example-images")
    rng = np.random.default_rng(7)
    paths = []
    for i, size in enumerate([(48, 40), (37, 61), (90, 64)]):
        paths.append(folder / f"photo{i}.png")
        make_photo(rng, size).save(paths[-1])
    rgba = make_photo(rng, (50, 50)).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8)))
    paths.append(folder / "transparent.png")
    rgba.save(paths[-1])
    paths.append(folder / "grey.jpg")
    make_photo(rng, (41, 33)).convert("L").save(paths[-1], quality=90)
    return paths


def run_example(cases: list[tuple[Path, Path]]) -> list[dict]:
    pairs = json.dumps([[str(bundle), str(image)] for bundle, image in cases])
    done = subprocess.run([sys.executable, "-I", "-c", RUNNER, str(SCRIPT), pairs],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    *rows, imported = done.stdout.strip().splitlines()
    assert json.loads(imported) == []  # neither lensforge nor torch was imported
    return [json.loads(row) for row in rows]


def assert_same_as_lensforge(bundles: list[Path], images: list[Path]) -> None:
    cases = [(bundle, image) for bundle in bundles for image in images]
    ours = run_example(cases)
    expected = [row for bundle in bundles for row in predict_files(bundle, images)]
    assert [row["label"] for row in ours] == [row["label"] for row in expected]
    np.testing.assert_allclose([row["score"] for row in ours], [row["confidence"] for row in expected],
                               rtol=0, atol=1e-5)  # fmt: skip


def test_example_matches_lensforge_predict(bundle, exported_bundle, v1_bundle, images):
    grey = exported_bundle("resnet10t", 1, 32).path
    assert_same_as_lensforge([bundle.path, grey, v1_bundle], images)


def test_example_applies_temperature_and_the_crop(bundle, images, tmp_path):
    guarded = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    preprocess = {**bundle.pre.to_dict(), "crop_pct": 0.875, "interpolation": "bicubic"}
    loaded = update_bundle(guarded, updates={"temperature": 0.4, "preprocess": preprocess})
    assert loaded.temperature == 0.4 and loaded.preprocess.crop_pct == 0.875
    assert_same_as_lensforge([guarded], images)
