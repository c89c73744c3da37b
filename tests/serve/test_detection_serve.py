"""The server app (FastAPI TestClient) on the session's detection bundle.

/v1/predict answers the rows ``predict_files`` prints for the same images (boxes in each
image's own pixels), /metrics counts the objects by class, /v1/model is the manifest.
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import wait_for
from PIL import Image

from lensforge.data.convert import convert_boxes
from lensforge.deploy import load_bundle, predict_files
from lensforge.serve import create_app, make_serve_config

DETECTIONS_LINE = re.compile(r'^lensforge_detections_total\{label="([^"]+)"\} ([0-9.e+]+)$', re.MULTILINE)


@pytest.fixture(scope="module")
def bundle_path(eager_detection_run_template: Path) -> Path:
    return eager_detection_run_template / "bundle"  # detections on every image (conftest.make_eager); only read


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three 64 px shapes images and one of them stretched to 128x80 (letterboxed with padding)."""
    root = tmp_path_factory.mktemp("serve-detect")
    convert_boxes("builtin:shapes?task=detect&n=3&size=64", "voc", root / "voc")
    files = sorted((root / "voc" / "JPEGImages").iterdir())
    wide = root / "wide_128x80.png"
    Image.open(files[0]).convert("RGB").resize((128, 80), Image.BICUBIC).save(wide)
    return [*files, wide]


@pytest.fixture(scope="module")
def client(bundle_path: Path) -> Iterator[TestClient]:
    app = create_app(bundle_path, make_serve_config({}))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=60, what="/readyz says ready")
        yield client


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (path.name, path.read_bytes(), "image/png")) for path in paths]


def _canonical(detections: list[dict]) -> list[tuple]:
    """Detections in a fixed order (class, box), so that scores tied to the 4th digit cannot reorder them."""
    return sorted((d["class_index"], d["label"], tuple(d["box"]), d["score"]) for d in detections)


def _detection_counts(client: TestClient) -> Counter:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return Counter({label: float(value) for label, value in DETECTIONS_LINE.findall(response.text)})


def test_predict_answers_the_rows_of_predict_files(client, bundle_path, images):
    response = client.post("/v1/predict", files=_files(images))
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    local = list(predict_files(bundle_path, images))
    assert [p["name"] for p in predictions] == [path.name for path in images]
    assert sum(row["count"] for row in local) > 0
    for served, row in zip(predictions, local):
        assert served["count"] == row["count"] == len(served["detections"])
        assert _canonical(served["detections"]) == _canonical(row["detections"])
        guard = served["guardrails"]
        assert guard["ood"] is None and guard["low_confidence"] is False  # no guardrails fitted; no confidence
        assert "label" not in served and "top_k" not in served  # a detector's row, not a classifier's
    wide = predictions[-1]
    assert max(d["box"][2] for d in wide["detections"]) > 64  # in the 128 px image's pixels


def test_json_base64_answers_the_same_as_multipart(client, images):
    by_files = client.post("/v1/predict", files=_files(images[:2])).json()["predictions"]
    body = {"images": [{"data": base64.b64encode(path.read_bytes()).decode()} for path in images[:2]]}
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 200, response.text
    for a, b in zip(by_files, response.json()["predictions"]):
        assert _canonical(a["detections"]) == _canonical(b["detections"])


def test_metrics_count_the_detections_by_label(client, images):
    before = _detection_counts(client)
    response = client.post("/v1/predict", files=_files(images))
    assert response.status_code == 200, response.text
    answered = Counter(d["label"] for p in response.json()["predictions"] for d in p["detections"])
    assert sum(answered.values()) > 0
    after = _detection_counts(client)
    assert {label: after[label] - before[label] for label in after if after[label] != before[label]} == answered


def test_model_endpoint_is_the_manifest(client, bundle_path):
    response = client.get("/v1/model")
    assert response.status_code == 200, response.text
    manifest = load_bundle(bundle_path).manifest
    assert response.json() == manifest
    assert response.json()["task"] == "detection" and "detection" in response.json()
