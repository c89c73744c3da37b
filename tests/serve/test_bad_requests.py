"""A corpus of bad requests against the real server: each gets its exact 4xx and a JSON error, never a 5xx.

After every case the server must still answer ``/healthz`` and classify a normal image;
odd but valid images (CMYK, 16-bit, animated, 1x1, WebP, ...) must be accepted.
"""

from __future__ import annotations

import base64
import io
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

MAX_IMAGES = 64  # server default max_images_per_request
MAX_UPLOAD_MB = 10  # server default max_upload_mb


# ---------------------------------------------------------------------------- payloads


def _encode(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _photo(size: int = 32, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, idat: bytes, *, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


@cache
def bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit ``side`` x ``side`` black PNG: 400 M pixels in ~50 KB (zeros compress ~1000:1)."""
    row_bytes = 1 + (side + 7) // 8  # filter byte + packed bits
    data = _png(side, side, zlib.compress(bytes(row_bytes * side), 9), bit_depth=1)
    assert len(data) < 200_000
    return data


def _files(*parts: tuple[str, bytes, str], field_name: str = "files") -> dict[str, Any]:
    return {"files": [(field_name, part) for part in parts]}


def _one_file(data: bytes, name: str = "x.png", content_type: str = "image/png") -> dict[str, Any]:
    return _files((name, data, content_type))


def _form(*parts: tuple[str, str | None, bytes]) -> dict[str, Any]:
    """A multipart body built by hand: ``(field, filename or None for a text field, bytes)`` parts."""
    body = b""
    for field_name, filename, data in parts:
        disposition = f'form-data; name="{field_name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return {"content": body + b"--XyZ--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=XyZ"}}


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _json_body(text: str | bytes) -> dict[str, Any]:
    return {"content": text, "headers": {"Content-Type": "application/json"}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    """One request: httpx ``request`` kwargs (built lazily, some payloads are large) or raw bytes."""

    name: str
    status: int
    code: str | None  # the error code expected in the body (None: only the status is fixed)
    build: Callable[[str], dict[str, Any]]  # digit PNG bytes -> request kwargs
    method: str = "POST"
    path: str = "/v1/predict"
    auth_server: bool = False
    raw: bool = False  # build returns {"raw": bytes}: sent over a plain socket (lying headers)
    mentions: tuple[str, ...] = field(default=())  # the message names one of these (case-insensitive)
    json_error: bool = True  # False: refused by uvicorn's HTTP parser, before the app (plain text)


def _raw_multipart(content_length: int, body: bytes) -> dict[str, Any]:
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: {content_length}\r\n\r\n")
    return {"raw": head.encode() + body}


def _raw_head(headers: str) -> dict[str, Any]:
    return {"raw": (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                    f"Content-Type: application/json\r\n{headers}\r\n\r\n{{}}").encode()}


def _multipart_body(digit: bytes) -> bytes:
    return (b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="d.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + digit + b"\r\n--XyZ--\r\n")


JPEG = _encode(_photo(64), "JPEG", quality=90)
PNG_RGB = _encode(_photo(32), "PNG")

REJECTED = [
    # ---- bytes that are not a decodable image: 400 bad_image
    Case("truncated_jpeg", 400, "bad_image", lambda d: _one_file(JPEG[: len(JPEG) // 2], "cut.jpg", "image/jpeg")),
    Case("truncated_png", 400, "bad_image", lambda d: _one_file(PNG_RGB[: len(PNG_RGB) * 2 // 3])),
    Case("zero_bytes", 400, "bad_image", lambda d: _one_file(b"", "empty.png")),
    Case("plain_text_file", 400, "bad_image", lambda d: _one_file(b"hello, not an image\n", "note.txt", "text/plain")),
    Case("html_named_png", 400, "bad_image",
         lambda d: _one_file(b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", "page.png")),
    Case("svg_image", 400, "bad_image", lambda d: _one_file(
        b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>',
        "vector.svg", "image/svg+xml")),
    Case("zero_width_png", 400, "bad_image", lambda d: _one_file(_png(0, 8, zlib.compress(b"\x00" * 8)))),
    Case("one_by_one_png", 400, "bad_image",  # the server needs 8 px a side for its quality checks
         lambda d: _one_file(_encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")), mentions=("small",)),
    Case("strip_4000x2", 400, "bad_image", lambda d: _one_file(_encode(Image.new("L", (4000, 2), 128), "PNG")),
         mentions=("small",)),
    Case("bad_image_second_of_three", 400, "bad_image",
         lambda d: _files(("a.png", d, "image/png"), ("b.gif", b"GIF89a garbage", "image/gif"),
                          ("c.png", d, "image/png"))),
    # ---- too many pixels: refused before decoding
    Case("png_decompression_bomb", 400, "image_too_large", lambda d: _one_file(bomb_png(), "bomb.png")),
    Case("huge_dimensions_header", 400, "image_too_large",
         lambda d: _one_file(_png(100_000, 100_000, zlib.compress(b"\x00" * 64)), "huge.png")),
    # ---- batch size
    Case("multipart_without_files", 400, "empty_batch", lambda d: _form(("note", None, b"no files here"))),
    Case("multipart_wrong_field_name", 400, "empty_batch", lambda d: _form(("image", "d.png", d))),
    Case("json_images_empty", 400, "empty_batch", lambda d: {"json": {"images": []}}),
    Case("too_many_images", 413, "too_many_images",
         lambda d: _files(*[(f"{i}.png", d, "image/png") for i in range(MAX_IMAGES + 1)]), mentions=(str(MAX_IMAGES),)),
    Case("body_over_max_upload", 413, "payload_too_large",
         lambda d: _one_file(b"\x00" * (MAX_UPLOAD_MB + 1) * 1024 * 1024, "big.png")),
    Case("json_body_over_max_upload", 413, "payload_too_large",
         lambda d: {"json": {"images": [{"data": "A" * (MAX_UPLOAD_MB + 1) * 1024 * 1024}]}}),
    # ---- content type
    Case("text_plain_body", 415, "unsupported_media_type",
         lambda d: {"content": b"just text", "headers": {"Content-Type": "text/plain"}}),
    Case("xml_body", 415, "unsupported_media_type",
         lambda d: {"content": b"<?xml version='1.0'?><images/>", "headers": {"Content-Type": "application/xml"}}),
    Case("raw_png_body", 415, "unsupported_media_type",
         lambda d: {"content": d, "headers": {"Content-Type": "image/png"}}),
    # ---- JSON
    Case("malformed_json", 422, "invalid_json", lambda d: _json_body('{"images": [')),
    Case("non_utf8_json", 422, "invalid_json", lambda d: _json_body(b'{"images": "\xff\xfe"}')),
    Case("json_missing_images", 422, "invalid_request", lambda d: {"json": {"pictures": []}},
         mentions=("images",)),
    Case("json_images_not_a_list", 422, "invalid_request", lambda d: {"json": {"images": "notalist"}},
         mentions=("images",)),
    Case("json_top_level_list", 422, "invalid_request", lambda d: {"json": [{"data": _b64(d)}]}),
    Case("json_nan_images", 422, "invalid_request", lambda d: _json_body('{"images": NaN}')),
    Case("json_nan_top_k", 422, "invalid_request",
         lambda d: _json_body(f'{{"images": [{{"data": "{_b64(d)}"}}], "top_k": NaN}}'), mentions=("top_k",)),
    Case("json_data_not_a_string", 422, "invalid_request", lambda d: {"json": {"images": [{"data": 123}]}}),
    Case("json_image_without_data", 422, "invalid_request", lambda d: {"json": {"images": [{"name": "x.png"}]}}),
    Case("json_images_nested_lists", 422, "invalid_request", lambda d: {"json": {"images": [["a", "b"]]}}),
    Case("json_name_not_a_string", 422, "invalid_request",
         lambda d: {"json": {"images": [{"data": _b64(d), "name": {"x": 1}}]}}),
    Case("json_bad_base64", 422, "invalid_request", lambda d: {"json": {"images": [{"data": "!!not base64!!"}]}},
         mentions=("base64",)),
    Case("multipart_files_field_as_text", 422, "invalid_request", lambda d: _form(("files", None, b"not a file"))),
    # ---- top_k
    Case("top_k_zero", 422, "invalid_request", lambda d: {**_one_file(d), "params": {"top_k": 0}},
         mentions=("top_k",)),
    Case("top_k_negative", 422, "invalid_request", lambda d: {**_one_file(d), "params": {"top_k": -3}},
         mentions=("top_k",)),
    Case("top_k_huge", 422, "invalid_request", lambda d: {**_one_file(d), "params": {"top_k": 10_000}},
         mentions=("top_k",)),
    Case("top_k_not_a_number", 422, "invalid_request", lambda d: {**_one_file(d), "params": {"top_k": "x"}},
         mentions=("top_k",)),
    Case("json_top_k_string", 422, "invalid_request",
         lambda d: {"json": {"images": [{"data": _b64(d)}], "top_k": "five"}}, mentions=("top_k",)),
    # ---- routes and methods
    Case("unknown_route", 404, "not_found", lambda d: {}, method="GET", path="/v1/nothing-here"),
    Case("wrong_method_get_predict", 405, "method_not_allowed", lambda d: {}, method="GET"),
    Case("wrong_method_delete_health", 405, "method_not_allowed", lambda d: {}, method="DELETE", path="/healthz"),
    # ---- auth (second server, with an API key)
    Case("missing_api_key", 401, "unauthorized", lambda d: _one_file(d), auth_server=True),
    Case("wrong_api_key", 403, "forbidden", lambda d: {**_one_file(d), "headers": {"X-API-Key": "wrong"}},
         auth_server=True),
    Case("wrong_bearer_token", 403, "forbidden", lambda d: {"headers": {"Authorization": "Bearer wrong"}},
         method="GET", path="/v1/drift", auth_server=True),
    # ---- lying headers (raw socket: httpx would fix them)
    Case("content_length_claims_100mb", 413, "payload_too_large",
         lambda d: _raw_multipart(100 * 1024 * 1024, _multipart_body(d)), raw=True),
    # the server reads 40 bytes: a multipart body cut before its first part holds no images
    Case("content_length_shorter_than_body", 400, "empty_batch", lambda d: _raw_multipart(40, _multipart_body(d)),
         raw=True),
    Case("content_length_not_a_number", 400, None, lambda d: _raw_head("Content-Length: abc"), raw=True,
         json_error=False),
    Case("content_length_twice", 400, None, lambda d: _raw_head("Content-Length: 2\r\nContent-Length: 7"), raw=True,
         json_error=False),
    Case("multipart_without_boundary", 422, "invalid_request",
         lambda d: {"content": _multipart_body(d), "headers": {"Content-Type": "multipart/form-data"}}),
]

# Odd but valid images: decoded and converted like any other (the decode rules of lensforge.data.decode).
ACCEPTED = {
    "cmyk_jpeg": lambda: _encode(_photo(32, "CMYK"), "JPEG"),
    "png_16_bit": lambda: _encode(Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 15), "PNG"),
    "animated_gif": lambda: _animated_gif(),
    "webp": lambda: _encode(_photo(32), "WEBP"),
    "rgba_png": lambda: _encode(_photo(32, "RGBA"), "PNG"),
    "palette_png": lambda: _encode(_photo(32, "P"), "PNG"),
    "bmp": lambda: _encode(_photo(16), "BMP"),
    "tiff": lambda: _encode(_photo(16), "TIFF"),
    "grey_jpeg_named_txt": lambda: _encode(_photo(16, "L"), "JPEG"),  # content decides, not the name
    "tall_strip_8x600": lambda: _encode(Image.new("L", (8, 600), 128), "PNG"),
    "exif_rotated_jpeg": lambda: _encode(_photo(24), "JPEG", exif=_exif_orientation(6)),
    "apng_two_frames": lambda: _encode(Image.new("RGB", (16, 16), (255, 0, 0)), "PNG", save_all=True,
                                       append_images=[Image.new("RGB", (16, 16), (0, 0, 255))]),
}


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _send_raw(url: str, payload: bytes, timeout_s: float = 20.0) -> httpx.Response:
    """Send bytes as they are and parse the first HTTP response (the server closes after it)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
            if b"\r\n\r\n" in received:
                head, _, body = received.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    break
    head, _, body = received.partition(b"\r\n\r\n")
    assert head, "no response at all"
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    length = int(headers.get("content-length", headers.get("Content-Length", len(body))))
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body[:length])


def send(case: Case, url: str, digit: bytes) -> httpx.Response:
    kwargs = case.build(digit)
    if case.raw:
        return _send_raw(url, kwargs["raw"])
    try:
        return httpx.request(case.method, url + case.path, timeout=60, **kwargs)
    except httpx.WriteError:
        pytest.fail("the server closed the connection before answering (should answer 413 first)")


def assert_error_body(response: httpx.Response, case: Case) -> None:
    assert response.headers.get("content-type", "").startswith("application/json"), response.text[:200]
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= {"code", "message", "index"}, error
    assert isinstance(error["code"], str) and error["code"]
    if case.code is not None:
        assert error["code"] == case.code, error
    message = error["message"]
    assert isinstance(message, str) and 10 <= len(message) <= 500 and "\n" not in message, message
    assert "Traceback" not in message
    if case.mentions:
        assert any(word.lower() in message.lower() for word in case.mentions), message
    assert error["index"] is None or isinstance(error["index"], int)


def test_the_corpus_is_large_enough():
    assert len(REJECTED) >= 25 and len({c.name for c in REJECTED}) == len(REJECTED)


@pytest.mark.parametrize("case", REJECTED, ids=[c.name for c in REJECTED])
def test_bad_request_gets_its_4xx_and_a_json_error(case, request, server, digit_png, predict_ok):
    target = request.getfixturevalue("auth_server") if case.auth_server else server
    response = send(case, target.url, digit_png)
    assert response.status_code == case.status, f"{case.name}: {response.status_code} {response.text[:300]}"
    if case.json_error:
        assert_error_body(response, case)
    if case.name == "bad_image_second_of_three":
        assert response.json()["error"]["index"] == 1
    predict_ok()  # still healthy and still classifying after every case


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_odd_but_valid_image_is_accepted(name, server):
    data = ACCEPTED[name]()
    response = httpx.post(server.url + "/v1/predict", files=[("files", (f"{name}.txt", data, "text/plain"))],
                          timeout=30)
    assert response.status_code == 200, response.text[:300]
    (row,) = response.json()["predictions"]
    assert 0.0 <= row["confidence"] <= 1.0 and isinstance(row["guardrails"]["input_quality"], list)


def test_batch_of_exactly_the_limit_is_accepted(server, digit_png):
    files = [("files", (f"{i}.png", digit_png, "image/png")) for i in range(MAX_IMAGES)]
    response = httpx.post(server.url + "/v1/predict", files=files, timeout=60)
    assert response.status_code == 200 and len(response.json()["predictions"]) == MAX_IMAGES


def test_server_survived_the_corpus_without_a_server_error(server, predict_ok):
    predict_ok()
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    counts = [line for line in metrics.splitlines() if line.startswith("lensforge_requests_total{")]
    assert any('status="4' in line for line in counts), counts  # the refusals were counted...
    # ...and no 5xx; /readyz answers 503 by design until the warm-up inference passed (a slow start under load)
    errors = [line for line in counts if 'status="5' in line and float(line.split()[-1]) > 0
              and 'route="/readyz",status="503"' not in line]
    assert not errors, counts
    assert "Traceback" not in server.log_tail(1_000_000), server.log_tail()
