"""The server app in-process (FastAPI TestClient) on a tiny guarded digits bundle.

Predictions (multipart and JSON agree, calibrated, guarded), probes, auth, metrics,
drift, every kind of bad request (a 4xx JSON error, never a 500), back-pressure and
timeouts, start-up refusals, and the serving path without torch.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import slow_fixture, wait_for
from PIL import Image

from lensforge.deploy.bundle import load_bundle, update_bundle
from lensforge.errors import ArtifactError, ConfigError, UsageError
from lensforge.serve import ServeConfig, create_app, make_serve_config
from lensforge.tasks.classification import softmax

TEMPERATURE = 1.7
GUARD_KEYS = {"ood", "low_confidence", "input_quality", "abstain"}


@pytest.fixture(scope="module")
def plain_bundle(digitnet_bundle_template, tmp_path_factory) -> Path:
    """The session's DigitNet bundle (8 px grey, 10 classes), copied, with temperature 1.7 and no guardrails."""
    path = shutil.copytree(digitnet_bundle_template, tmp_path_factory.mktemp("serve") / "plain")
    update_bundle(path, updates={"temperature": TEMPERATURE})
    return path


@slow_fixture(scope="module")
def bundle(plain_bundle, tmp_path_factory) -> Path:
    """The same bundle with guardrails (OOD, quality, abstain and drift reference) fitted on digits."""
    from lensforge.stress.ood import fit_guardrails

    path = shutil.copytree(plain_bundle, tmp_path_factory.mktemp("serve") / "guarded")
    fit_guardrails(path, "builtin:digits", n_ood=64)
    return path


@contextmanager
def serving(bundle_path: Path, **options) -> Iterator[TestClient]:
    """A TestClient on a fresh app, once /readyz says ready (warm-up done)."""
    app = create_app(bundle_path, make_serve_config(options))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=30, what="/readyz says ready")
        yield client


@pytest.fixture(scope="module")
def client(bundle) -> Iterator[TestClient]:
    with serving(bundle) as client:
        yield client


def png(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def as_files(blobs: list[bytes], field: str = "files") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"img{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]


def as_json(blobs: list[bytes], **extra) -> dict:
    return {"images": [{"data": base64.b64encode(blob).decode()} for blob in blobs], **extra}


def assert_error(response, status: int, code: str, index: int | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["index"] == index and error["message"] and "\n" not in error["message"]
    return error


# ---------------------------------------------------------------------------- predictions


def test_multipart_and_json_give_the_same_predictions(client, digits, bundle):
    blobs = [png(array) for array, _ in digits]
    by_files = client.post("/v1/predict", files=as_files(blobs))
    by_json = client.post("/v1/predict", json=as_json(blobs))
    assert by_files.status_code == by_json.status_code == 200, (by_files.text, by_json.text)
    files_rows, json_rows = by_files.json()["predictions"], by_json.json()["predictions"]
    assert [row["name"] for row in files_rows] == [f"img{i}.png" for i in range(len(blobs))]
    assert all(row["name"] is None for row in json_rows)
    for a, b in zip(files_rows, json_rows):
        assert {**a, "name": None} == b
    correct = sum(row["label"] == label for row, (_, label) in zip(files_rows, digits))
    assert correct >= 10  # the model learned digits, and the server feeds it like training did
    answer = by_files.json()
    manifest = load_bundle(bundle).manifest
    assert answer["model"] == {"name": "digitnet", "sha256": manifest["files"]["model.onnx"]["sha256"],
                               "lensforge": "0.1.0"}
    assert answer["latency_ms"] > 0


def test_probabilities_are_calibrated_with_the_bundle_temperature(client, digits, bundle):
    arrays = [array for array, _ in digits[:4]]
    response = client.post("/v1/predict?top_k=10", files=as_files([png(a) for a in arrays]))
    loaded = load_bundle(bundle)
    logits, _ = loaded.predict_uint8(np.stack([a[None] for a in arrays]))
    expected = softmax(logits, TEMPERATURE)
    for row, probs in zip(response.json()["predictions"], expected):
        got = {entry["label"]: entry["prob"] for entry in row["top_k"]}
        assert len(got) == 10 and sum(got.values()) == pytest.approx(1.0, abs=1e-9)
        assert [got[name] for name in loaded.class_names] == pytest.approx(probs, abs=1e-6)
        assert [entry["prob"] for entry in row["top_k"]] == sorted(got.values(), reverse=True)
        assert row["confidence"] == row["top_k"][0]["prob"] and row["label"] == row["top_k"][0]["label"]
        assert row["class_index"] == loaded.class_names.index(row["label"])


def test_top_k_from_query_and_json_and_the_default(client, digits):
    blob = png(digits[0][0])
    assert len(client.post("/v1/predict", files=as_files([blob], "file")).json()["predictions"][0]["top_k"]) == 5
    assert len(client.post("/v1/predict?top_k=2", files=as_files([blob])).json()["predictions"][0]["top_k"]) == 2
    body = as_json([blob], top_k=3)
    assert len(client.post("/v1/predict?top_k=7", json=body).json()["predictions"][0]["top_k"]) == 3  # body wins


def test_guardrail_fields_and_ood_flag_on_uniform_noise(client, digits):
    rng = np.random.default_rng(0)
    noise = [png(rng.integers(0, 256, (32, 32), dtype=np.uint8)) for _ in range(8)]
    normal = [png(array) for array, _ in digits[:8]]
    rows = client.post("/v1/predict", files=as_files(normal + noise)).json()["predictions"]
    for row in rows:
        guard = row["guardrails"]
        assert set(guard) == GUARD_KEYS
        assert set(guard["ood"]) == {"flag", "score", "threshold"}
        assert guard["ood"]["flag"] == (guard["ood"]["score"] > guard["ood"]["threshold"])
        assert isinstance(guard["low_confidence"], bool) and isinstance(guard["input_quality"], list)
        if guard["ood"]["flag"] or guard["low_confidence"] or guard["input_quality"]:
            assert guard["abstain"]  # any guard that says "don't trust" makes the server abstain
    normal_rows, noise_rows = rows[:8], rows[8:]
    assert sum(row["guardrails"]["ood"]["flag"] for row in noise_rows) >= 7
    assert all(row["guardrails"]["abstain"] for row in noise_rows if row["guardrails"]["ood"]["flag"])
    assert sum(row["guardrails"]["ood"]["flag"] for row in normal_rows) <= 2


def test_a_bundle_without_guardrails_still_answers_every_field(plain_bundle, digits):
    with serving(plain_bundle, low_confidence=0.99) as client:
        rows = client.post("/v1/predict", files=as_files([png(digits[0][0])])).json()["predictions"]
        drift = client.get("/v1/drift").json()
    guard = rows[0]["guardrails"]
    assert guard["ood"] is None and guard["input_quality"] == []
    assert guard["low_confidence"] == (rows[0]["confidence"] < 0.99) and guard["abstain"] == guard["low_confidence"]
    assert drift["enabled"] is False and "drift reference" in drift["reason"]


def test_image_modes_and_animated_gifs_are_accepted(client, digits):
    array = digits[0][0]
    rgba = np.dstack([array, array, array, np.full_like(array, 255)])
    frames = [Image.fromarray(array), Image.fromarray(255 - array)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    sixteen = io.BytesIO()
    Image.fromarray(array.astype(np.uint16) * 257).save(sixteen, format="PNG")
    jpeg = io.BytesIO()
    Image.fromarray(array).resize((64, 64)).convert("CMYK").save(jpeg, format="JPEG", quality=95)
    blobs = [png(array), png(rgba), gif.getvalue(), sixteen.getvalue(), jpeg.getvalue()]
    rows = client.post("/v1/predict", files=as_files(blobs)).json()["predictions"]
    labels = [row["label"] for row in rows]
    assert labels[:4] == [labels[0]] * 4  # RGBA, the GIF's first frame and 16-bit decode to the same digit


# ---------------------------------------------------------------------------- probes, auth, metrics, drift


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["model"] == "digitnet" and body["warmup_ms"] >= 0


def test_model_route_returns_the_manifest(client, bundle):
    assert client.get("/v1/model").json() == json.loads((bundle / "manifest.json").read_text())


def test_api_key_guards_every_route_but_the_probes(bundle, monkeypatch, digits):
    monkeypatch.setenv("LF_TEST_KEY", "s3cret-key")
    with serving(bundle, api_key_env="LF_TEST_KEY") as client:
        for route in ("/v1/model", "/v1/drift", "/metrics"):
            assert_error(client.get(route), 401, "unauthorized")
            assert_error(client.get(route, headers={"X-API-Key": "wrong"}), 403, "forbidden")
            assert client.get(route, headers={"X-API-Key": "s3cret-key"}).status_code == 200
            assert client.get(route, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert_error(client.post("/v1/predict", files=as_files([png(digits[0][0])])), 401, "unauthorized")
        assert_error(client.get("/v1/model", headers={"Authorization": "Bearer nope"}), 403, "forbidden")
        assert_error(client.get("/v1/model", headers={"Authorization": "Basic czNjcmV0"}), 401, "unauthorized")
        ok = client.post("/v1/predict", files=as_files([png(digits[0][0])]), headers={"X-API-Key": "s3cret-key"})
        assert ok.status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


@pytest.mark.parametrize("value", [None, ""])
def test_an_unset_or_empty_api_key_refuses_to_start(bundle, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("LF_TEST_KEY", raising=False)
    else:
        monkeypatch.setenv("LF_TEST_KEY", value)
    with pytest.raises(UsageError, match="LF_TEST_KEY"):
        create_app(bundle, make_serve_config({"api_key_env": "LF_TEST_KEY"}))


def metric(text: str, sample_name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus exposition ``text``."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(sample_name):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        if sample == sample_name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"no sample {sample_name} {labels} in the metrics")


def test_metrics_count_requests_images_batches_and_guardrails(bundle, digits):
    rng = np.random.default_rng(1)
    with serving(bundle) as client:
        client.post("/v1/predict", files=as_files([png(array) for array, _ in digits[:3]]))
        client.post("/v1/predict", files=as_files([png(rng.integers(0, 256, (16, 16), dtype=np.uint8))]))
        client.post("/v1/predict", files=as_files([b"not an image"]))
        client.get("/no/such/route")
        text = client.get("/metrics").text
    assert metric(text, "lensforge_requests_total", route="/v1/predict", status="200") == 2
    assert metric(text, "lensforge_requests_total", route="/v1/predict", status="400") == 1
    assert metric(text, "lensforge_requests_total", route="other", status="404") == 1
    assert metric(text, "lensforge_images_predicted_total") == 4
    assert metric(text, "lensforge_images_ood_total") >= 1  # the noise image
    assert metric(text, "lensforge_images_abstained_total") >= 1
    assert metric(text, "lensforge_images_low_confidence_total") >= 0
    assert metric(text, "lensforge_batch_size_images_count") == 2
    assert metric(text, "lensforge_batch_size_images_sum") == 4
    assert metric(text, "lensforge_request_latency_seconds_count", route="/v1/predict") == 3
    assert metric(text, "lensforge_queue_depth_images") == 0
    assert metric(text, "lensforge_model_info", name="digitnet") == 1
    assert metric(text, "lensforge_drift", name="observed") == 4  # the drift monitor saw every predicted image
    assert metric(text, "lensforge_drift", name="drifting") == 0


def test_two_apps_in_one_process_keep_their_own_metrics(bundle, digits):
    with serving(bundle) as first, serving(bundle) as second:
        first.post("/v1/predict", files=as_files([png(digits[0][0])]))
        assert metric(first.get("/metrics").text, "lensforge_images_predicted_total") == 1
        assert metric(second.get("/metrics").text, "lensforge_images_predicted_total") == 0


def test_drift_report_of_a_guarded_bundle(client):
    report = client.get("/v1/drift").json()
    assert report["enabled"] is True and isinstance(report["drifting"], bool)
    assert isinstance(report["scores"], dict)


# ---------------------------------------------------------------------------- bad requests


def _bomb() -> bytes:
    # 7000 x 6000 = 42 M pixels (over the 40 M limit) in a few kB: 1-bit and all white
    return png(np.ones((6000, 7000), dtype=bool))


def _truncated(digit: np.ndarray) -> bytes:
    whole = png(np.kron(digit, np.ones((8, 8), np.uint8)))  # 64 x 64, big enough to cut mid-data
    return whole[: len(whole) // 2]


BAD_UPLOADS = {
    "zero bytes": (lambda d: b"", 400, "bad_image"),
    "text": (lambda d: b"hello, I am not an image\n" * 20, 400, "bad_image"),
    "truncated png": (_truncated, 400, "bad_image"),
    "png header only": (lambda d: png(d)[:33], 400, "bad_image"),
    "too small": (lambda d: png(d[:4, :4]), 400, "bad_image"),
    "one pixel wide": (lambda d: png(d[:, :1]), 400, "bad_image"),
    "decompression bomb": (lambda d: _bomb(), 400, "image_too_large"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
@pytest.mark.parametrize("how", ["multipart", "json"])
def test_a_bad_image_is_a_400_naming_its_index(client, digits, case, how):
    make, status, code = BAD_UPLOADS[case]
    blobs = [png(digits[0][0]), make(digits[1][0])]
    sent = (client.post("/v1/predict", files=as_files(blobs)) if how == "multipart"
            else client.post("/v1/predict", json=as_json(blobs)))
    error = assert_error(sent, status, code, index=1)
    assert error["message"].startswith("image 1")


@pytest.mark.parametrize("kind, send, status, code", [
    ("no files field", dict(files={"other": ("a.png", b"x", "image/png")}), 400, "empty_batch"),
    ("files as text", dict(data={"files": "abc"}, files={"x": ("x", b"", "text/plain")}), 422, "invalid_request"),
    ("empty json list", dict(json={"images": []}), 400, "empty_batch"),
    ("malformed json", dict(content=b'{"images": [', headers={"content-type": "application/json"}), 422,
     "invalid_json"),
    ("json not an object", dict(json=[1, 2]), 422, "invalid_request"),
    ("json missing images", dict(json={"pictures": []}), 422, "invalid_request"),
    ("json images not a list", dict(json={"images": "abc"}), 422, "invalid_request"),
    ("json data missing", dict(json={"images": [{"name": "a"}]}), 422, "invalid_request"),
    ("json data not a string", dict(json={"images": [{"data": 5}]}), 422, "invalid_request"),
    ("json bad base64", dict(json={"images": [{"data": "***not base64***"}]}), 422, "invalid_request"),
    ("json top_k zero", dict(json={"images": [{"data": "AAAA"}], "top_k": 0}), 422, "invalid_request"),
    ("json top_k too big", dict(json={"images": [{"data": "AAAA"}], "top_k": 11}), 422, "invalid_request"),
    ("json top_k a string", dict(json={"images": [{"data": "AAAA"}], "top_k": "3"}), 422, "invalid_request"),
    ("query top_k too big", dict(params={"top_k": 11}, json={"images": [{"data": "AAAA"}]}), 422,
     "invalid_request"),
    ("query top_k not a number", dict(params={"top_k": "x"}, json={"images": [{"data": "AAAA"}]}), 422,
     "invalid_request"),
    ("text/plain", dict(content=b"abc", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    ("no content type", dict(content=b"abc"), 415, "unsupported_media_type"),
    ("multipart without boundary", dict(content=b"abc", headers={"content-type": "multipart/form-data"}), 422,
     "invalid_request"),
    ("bad content length", dict(content=b"{}", headers={"content-type": "application/json",
                                                        "content-length": "nope"}), 400, "bad_request"),
])
def test_malformed_requests_get_a_4xx_json_error(client, kind, send, status, code):
    response = client.post("/v1/predict", **send)
    index = 0 if kind in ("files as text", "json data missing", "json data not a string", "json bad base64") else None
    assert_error(response, status, code, index=index)


def test_unknown_routes_and_methods_get_the_error_shape(client):
    assert_error(client.get("/v2/predict"), 404, "not_found")
    wrong_method = client.get("/v1/predict")
    assert_error(wrong_method, 405, "method_not_allowed")
    assert "POST" in wrong_method.headers["allow"]
    assert_error(client.delete("/healthz"), 405, "method_not_allowed")


def test_limits_on_body_size_and_image_count(bundle, digits):
    blob = png(digits[0][0])
    with serving(bundle, max_upload_mb=0.01, max_images_per_request=3) as client:
        assert_error(client.post("/v1/predict", files=as_files([blob] * 4)), 413, "too_many_images")
        assert_error(client.post("/v1/predict", json=as_json([blob] * 4)), 413, "too_many_images")
        big = {"images": [{"data": "A" * 20_000}]}
        assert_error(client.post("/v1/predict", json=big), 413, "payload_too_large")  # from Content-Length

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
            yield b'{"images": [{"data": "'
            for _ in range(30):
                yield b"A" * 1000
            yield b'"}]}'

        response = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
        assert_error(response, 413, "payload_too_large")
        assert client.post("/v1/predict", files=as_files([blob] * 3)).status_code == 200


def test_a_body_trickling_in_slower_than_the_timeout_gets_408(bundle):
    app = create_app(bundle, make_serve_config({"request_timeout_s": 0.2}))
    sent: list[dict] = []

    async def receive() -> dict:  # the first chunk, then a client that goes quiet
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": b'{"images": ', "more_body": True}
        await asyncio.sleep(5)
        return {"type": "http.request", "body": b"[]}", "more_body": False}

    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 3))
    assert messages[0]["status"] == 408
    assert json.loads(messages[1]["body"])["error"]["code"] == "request_timeout"


def test_an_unexpected_failure_is_a_json_500(bundle, digits):
    with serving(bundle) as client:
        service = client.app.state.service

        def broken(images):
            raise RuntimeError("simulated bug")

        service.bundle.predict_uint8 = broken
        assert_error(client.post("/v1/predict", files=as_files([png(digits[0][0])])), 500, "internal_error")
        assert client.get("/healthz").status_code == 200  # the server lives on


# ---------------------------------------------------------------------------- batching, back-pressure, timeouts


@contextmanager
def gated(service) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Hold every inference of ``service`` until the yielded gate is set; ``entered`` says one started."""
    gate, entered = threading.Event(), threading.Event()
    original = service.bundle.predict_uint8

    def held(images):
        entered.set()
        gate.wait(20)
        return original(images)

    service.bundle.predict_uint8 = held
    try:
        yield gate, entered
    finally:
        gate.set()
        service.bundle.predict_uint8 = original


@pytest.mark.parametrize("max_batch, batches", [(32, 2), (1, 8)])
def test_concurrent_requests_share_batches(bundle, digits, max_batch, batches):
    blob = png(digits[0][0])
    with serving(bundle, max_batch=max_batch, max_wait_ms=0) as client, ThreadPoolExecutor(8) as pool:
        service = client.app.state.service
        before = service.batcher.batches_run  # the warm-up does not go through the queue
        with gated(service) as (gate, entered):
            first = pool.submit(client.post, "/v1/predict", files=as_files([blob]))
            wait_for(entered.is_set)  # one request is in the model; seven more arrive meanwhile
            rest = [pool.submit(client.post, "/v1/predict", files=as_files([blob])) for _ in range(7)]
            wait_for(lambda: service.batcher.queue_depth == 7)
            gate.set()
            responses = [first.result()] + [future.result() for future in rest]
    assert all(response.status_code == 200 for response in responses)
    assert service.batcher.batches_run - before == batches


def test_a_full_queue_answers_503_with_retry_after(bundle, digits):
    blob = png(digits[0][0])
    with serving(bundle, max_batch=1, max_wait_ms=0, queue_size=2) as client, ThreadPoolExecutor(4) as pool:
        service = client.app.state.service
        with gated(service) as (gate, entered):
            busy = pool.submit(client.post, "/v1/predict", files=as_files([blob]))
            wait_for(entered.is_set)
            queued = [pool.submit(client.post, "/v1/predict", files=as_files([blob])) for _ in range(2)]
            wait_for(lambda: service.batcher.queue_depth == 2)
            refused = client.post("/v1/predict", files=as_files([blob]))
            gate.set()
            answered = [busy.result()] + [future.result() for future in queued]
        assert_error(refused, 503, "overloaded")
        assert int(refused.headers["retry-after"]) >= 1
        assert [response.status_code for response in answered] == [200, 200, 200]
        # a request larger than the whole queue could never fit: 413, not 503
        assert_error(client.post("/v1/predict", files=as_files([blob] * 3)), 413, "too_many_images")
        text = client.get("/metrics").text
    assert metric(text, "lensforge_requests_total", route="/v1/predict", status="503") == 1


def test_a_request_waiting_too_long_gets_504(bundle, digits):
    blob = png(digits[0][0])
    with serving(bundle, request_timeout_s=0.3) as client:
        with gated(client.app.state.service):
            assert_error(client.post("/v1/predict", files=as_files([blob])), 504, "timeout")
        assert client.post("/v1/predict", files=as_files([blob])).status_code == 200


# ---------------------------------------------------------------------------- start-up and configuration


@pytest.mark.parametrize("damage", ["model", "ood file", "manifest"])
def test_a_damaged_bundle_refuses_to_start(bundle, tmp_path, damage):
    broken = shutil.copytree(bundle, tmp_path / "broken")
    target = {"model": broken / "model.onnx", "ood file": broken / "guardrails" / "ood.npz",
              "manifest": broken / "manifest.json"}[damage]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        create_app(broken, ServeConfig())


def test_a_missing_bundle_refuses_to_start(tmp_path):
    with pytest.raises(ArtifactError, match="not a lensforge bundle"):
        create_app(tmp_path / "nothing")


@pytest.mark.parametrize("values, match", [
    ({"max_batch": 0}, "max_batch"),
    ({"port": 70000}, "port"),
    ({"max_wait_ms": -1}, "max_wait_ms"),
    ({"low_confidence": 1.5}, "low_confidence"),
    ({"max_batch": "many"}, "max_batch"),
    ({"batch": 4}, "batch: unknown option"),
    ({"api_key_env": "NOT A NAME"}, "api_key_env"),
    ({"workers": 2, "port": 0}, "explicit port"),
])
def test_bad_serve_options_are_one_line_config_errors(values, match):
    with pytest.raises(ConfigError, match=match) as refused:
        make_serve_config(values)
    assert "\n" not in str(refused.value)


def test_serve_config_is_frozen_with_documented_defaults():
    cfg = make_serve_config({})
    assert (cfg.host, cfg.port, cfg.workers, cfg.max_batch, cfg.max_wait_ms, cfg.queue_size) == (
        "127.0.0.1", 8000, 1, 32, 5.0, 256)
    assert (cfg.request_timeout_s, cfg.max_upload_mb, cfg.max_image_pixels, cfg.max_images_per_request) == (
        10.0, 10.0, 40_000_000, 64)
    assert (cfg.top_k, cfg.drift_window, cfg.low_confidence, cfg.api_key_env) == (5, 1000, None, None)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type is an implementation detail
        cfg.port = 1


def test_the_serving_path_never_imports_torch(bundle, digits):
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class BlockTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, BlockTorch())
        import time
        from fastapi.testclient import TestClient
        from lensforge.serve import create_app, make_serve_config
        app = create_app({str(bundle)!r}, make_serve_config({{}}))
        with TestClient(app) as client:
            for _ in range(500):
                if client.get("/readyz").status_code == 200:
                    break
                time.sleep(0.01)
            answer = client.post("/v1/predict", files={{"files": ("a.png", {png(digits[0][0])!r}, "image/png")}})
            assert answer.status_code == 200, answer.text
            assert client.get("/metrics").status_code == 200 and client.get("/v1/drift").json()["enabled"]
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_openapi_describes_both_request_bodies(client):
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/v1/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"200", "400", "401", "403", "408", "413", "415", "422", "503", "504"} <= set(predict["responses"])
