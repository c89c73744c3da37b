"""The Python client against the real server: predictions, probes, raw HTTP, remote predict rows, auth."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from lensforge.client import Client, ServerError, error_from_response, predict_remote
from lensforge.errors import LensforgeError


def test_client_classifies_digits_with_calibrated_probs_and_guardrails(server, digits):
    class_names = [str(d) for d in range(10)]
    with Client(server.url) as client:
        rows = client.predict([array for array, _ in digits], top_k=10)
    assert len(rows) == len(digits)
    for row in rows:
        assert row["label"] in class_names and row["label"] == class_names[row["class_index"]]
        probs = [entry["prob"] for entry in row["top_k"]]
        assert len(probs) == 10 and sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert probs == sorted(probs, reverse=True) and row["confidence"] == pytest.approx(probs[0])
        assert row["top_k"][0]["label"] == row["label"]
        guardrails = row["guardrails"]
        assert set(guardrails["ood"]) == {"flag", "score", "threshold"}  # the bundle has an OOD detector
        assert guardrails["ood"]["flag"] == (guardrails["ood"]["score"] > guardrails["ood"]["threshold"])
        assert isinstance(guardrails["low_confidence"], bool) and isinstance(guardrails["abstain"], bool)
        assert isinstance(guardrails["input_quality"], list)
    correct = sum(row["label"] == label for row, (_, label) in zip(rows, digits))
    assert correct >= 9  # the 3-epoch 8 px model (83% on the test split, 12 of 12 here); chance is 1.2 of 12


def test_paths_bytes_and_arrays_give_the_same_answer(server, digits, png, tmp_path):
    array = digits[1][0]
    path = tmp_path / "digit.png"
    path.write_bytes(png(array))
    with Client(server.url) as client:
        from_path, from_bytes, from_array = client.predict([path, path.read_bytes(), array], top_k=3)
        single = client.predict(str(path), top_k=3)  # one image given bare
    assert from_path["name"] == "digit.png"
    for row in (from_bytes, from_array, single[0]):
        assert row["label"] == from_path["label"]
        assert row["confidence"] == pytest.approx(from_path["confidence"], abs=1e-6)


def test_probes_manifest_metrics_and_drift(server):
    with Client(server.url) as client:
        assert client.health() and client.ready()
        client.wait_ready(1.0)
        client.predict([np.zeros((8, 8), np.uint8)])
        manifest = client.model()
        assert manifest["class_names"] == [str(d) for d in range(10)] and "guardrails" in manifest
        metrics = client.metrics()
        assert "# TYPE" in metrics and "# HELP" in metrics
        assert isinstance(client.drift(), dict)
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["warmup_ms"] >= 0 and ready["model"]


def test_multipart_and_json_base64_agree(server, digits, png):
    data = png(digits[2][0])
    multipart = httpx.post(server.url + "/v1/predict", params={"top_k": 2},
                           files=[("files", ("a.png", data, "image/png"))])
    as_json = httpx.post(server.url + "/v1/predict", json={
        "images": [{"data": base64.b64encode(data).decode(), "name": "a.png"}], "top_k": 2})
    single_field = httpx.post(server.url + "/v1/predict", files=[("file", ("a.png", data, "image/png"))],
                              params={"top_k": 2})
    for response in (multipart, as_json, single_field):
        assert response.status_code == 200, response.text
    answers = [r.json() for r in (multipart, as_json, single_field)]
    first = answers[0]["predictions"][0]
    assert first["name"] == "a.png" and len(first["top_k"]) == 2
    for answer in answers[1:]:
        row = answer["predictions"][0]
        assert row["label"] == first["label"] and row["confidence"] == pytest.approx(first["confidence"])
        assert [e["label"] for e in row["top_k"]] == [e["label"] for e in first["top_k"]]
    model = answers[0]["model"]
    assert set(model) >= {"name", "sha256", "lensforge"} and answers[0]["latency_ms"] >= 0


def test_predict_remote_rows_match_local_predict(server, served_bundle, digits, png, tmp_path):
    from lensforge.deploy.bundle import load_bundle
    from lensforge.deploy.predict import predict_files

    threshold = load_bundle(served_bundle).manifest["guardrails"]["abstain"]["threshold"]
    for i, (array, label) in enumerate(digits[:5]):
        (tmp_path / f"{i}_{label}.png").write_bytes(png(array))
    noise = np.random.default_rng(0).integers(0, 256, digits[0][0].shape, dtype=np.uint8)
    (tmp_path / "9_noise.png").write_bytes(png(noise))  # out of distribution: both paths must abstain alike
    (tmp_path / "9_dark.png").write_bytes(png(np.zeros_like(digits[0][0])))  # fails a quality check
    remote = list(predict_remote(server.url, tmp_path, top_k=3))
    local = list(predict_files(served_bundle, tmp_path, top_k=3))
    assert [row["path"] for row in remote] == [row["path"] for row in local]
    for far, near in zip(remote, local):
        assert set(far) == set(near)  # same keys, guardrail fields included
        assert far["label"] == near["label"] and far["class_index"] == near["class_index"]
        assert far["confidence"] == pytest.approx(near["confidence"], abs=1e-5)
        assert far["ood"] == near["ood"] and far["ood_score"] == pytest.approx(near["ood_score"], rel=1e-4, abs=1e-5)
        assert far["quality"] == near["quality"] and far["abstain"] == near["abstain"]
        assert near["abstain"] == bool(near["ood"] or near["quality"] or near["confidence"] < threshold)


def test_predict_remote_names_the_bad_file(server, digits, png, tmp_path):
    (tmp_path / "a_good.png").write_bytes(png(digits[0][0]))
    (tmp_path / "b_bad.png").write_bytes(b"this is not a png")
    with pytest.raises(ServerError, match="b_bad.png") as caught:
        list(predict_remote(server.url, tmp_path))
    assert caught.value.status == 400 and caught.value.code == "bad_image"
    (tmp_path / "c_good.png").write_bytes(png(digits[1][0]))
    rows = list(predict_remote(server.url, tmp_path, on_bad_image="skip"))
    assert [Path(row["path"]).name for row in rows] == ["a_good.png", "b_bad.png", "c_good.png"]
    assert "label" in rows[0] and "label" in rows[2] and "bad_image" in rows[1]["error"]
    with pytest.raises(LensforgeError, match="no such file"):
        predict_remote(server.url, [tmp_path / "missing.png"])


def test_server_error_carries_status_code_and_index(server, digit_png):
    with Client(server.url) as client, pytest.raises(ServerError) as caught:
        client.predict([digit_png, b"\x89PNG\r\n\x1a\n truncated"])
    error = caught.value
    assert (error.status, error.code, error.index) == (400, "bad_image", 1)
    assert "\n" not in str(error) and "400 bad_image (image 1)" in str(error) and server.url in str(error)


def test_unreachable_server_is_a_clear_server_error(unused_url):
    url = unused_url
    with Client(url, timeout=2.0) as client:
        assert not client.health() and not client.ready()
        with pytest.raises(ServerError, match="cannot reach the lensforge server") as caught:
            client.predict([np.zeros((8, 8), np.uint8)])
        assert url in str(caught.value) and caught.value.status is None
        with pytest.raises(ServerError, match="not ready after"):
            client.wait_ready(0.3)


def test_error_bodies_that_are_not_lensforge_json_still_read_clearly():
    proxy = error_from_response("GET http://h/v1/model", httpx.Response(502, text="<html>\n Bad gateway </html>"))
    assert (proxy.status, proxy.code) == (502, None) and "502: <html> Bad gateway </html>" in str(proxy)
    body = {"error": {"code": "overloaded", "message": "queue full", "index": None}}
    overloaded = error_from_response("POST http://h/v1/predict",
                                     httpx.Response(503, headers={"Retry-After": "2"}, json=body))
    assert overloaded.retry_after_s == 2.0 and str(overloaded) == "POST http://h/v1/predict: 503 overloaded: queue full"


def test_client_import_stays_torch_free():
    import subprocess

    code = "import sys, lensforge.client; sys.exit(int(any(m in sys.modules for m in ('torch', 'onnxruntime'))))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------- auth


def test_auth_missing_401_wrong_403_right_200(auth_server, api_key, digit_png):
    url = auth_server.url
    files = [("files", ("d.png", digit_png, "image/png"))]
    missing = httpx.post(url + "/v1/predict", files=files)
    wrong = httpx.post(url + "/v1/predict", files=files, headers={"X-API-Key": "not-the-key"})
    wrong_bearer = httpx.get(url + "/v1/model", headers={"Authorization": "Bearer not-the-key"})
    assert (missing.status_code, wrong.status_code, wrong_bearer.status_code) == (401, 403, 403)
    for response in (missing, wrong, wrong_bearer):
        error = response.json()["error"]
        assert error["code"] and error["message"]
    assert httpx.post(url + "/v1/predict", files=files, headers={"X-API-Key": api_key}).status_code == 200
    assert httpx.get(url + "/v1/model", headers={"Authorization": f"Bearer {api_key}"}).status_code == 200
    for route in ("/v1/model", "/v1/drift", "/metrics"):
        assert httpx.get(url + route).status_code == 401, route
    for route in ("/healthz", "/readyz"):  # probes stay open for load balancers
        assert httpx.get(url + route).status_code == 200, route


def test_client_sends_the_api_key(auth_server, api_key, digit_png):
    with Client(auth_server.url, api_key=api_key) as client:
        assert client.model()["class_names"] and client.metrics()
        assert len(client.predict([digit_png])) == 1
    with Client(auth_server.url) as client:
        assert client.health()
        with pytest.raises(ServerError) as caught:
            client.model()
        assert caught.value.status == 401
    with Client(auth_server.url, api_key="wrong") as client, pytest.raises(ServerError) as caught:
        client.predict([digit_png])
    assert caught.value.status == 403
