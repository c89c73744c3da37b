"""Reading, parsing and decoding prediction requests; every bad input becomes an :class:`ApiError`.

Bodies are read with a byte limit (from Content-Length, then while streaming), parsed
as multipart uploads (field ``files`` or ``file``) or JSON with base64 images, and
decoded with :func:`lensforge.data.decode.decode_image` (decompression bombs refused,
EXIF orientation applied, palette/CMYK/16-bit/alpha converted). Image sizes are checked
from the header before any pixel is decoded. Animated images (GIF, APNG, WebP, multi-page
TIFF) are predicted on their first frame, as ``lensforge predict`` does.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import warnings
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from lensforge.data.decode import decode_image
from lensforge.data.preprocess import Preprocess, resize_to_input
from lensforge.deploy.guardrails import MIN_SIDE_PX
from lensforge.errors import DataError

logger = logging.getLogger("lensforge.serve")

IMAGE_FIELDS = ("files", "file")  # multipart field names that hold images
_MAX_TEXT_FIELDS = 32  # form fields other than images (ignored); more is not a client we serve


class ApiError(Exception):
    """A refused request: HTTP status, a stable ``code``, one line for people, the image index."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        index: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = " ".join(message.split())  # one line, whatever the cause said
        self.index = index
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.index)


def error_body(code: str, message: str, index: int | None = None) -> dict[str, Any]:
    """The JSON every error response carries."""
    return {"error": {"code": code, "message": message, "index": index}}


@dataclass(frozen=True)
class Upload:
    """One image as received: its bytes and the name the client gave (file name or JSON ``name``)."""

    data: bytes
    name: str | None


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_body_bytes: int
    max_images: int
    max_pixels: int
    num_classes: int


@dataclass(frozen=True)
class DecodedBatch:
    """Model inputs of one request: uint8 (N, C, H, W), decoded (width, height), names."""

    images: np.ndarray
    sizes: list[tuple[int, int]]
    names: list[str | None]


# ---------------------------------------------------------------------------- body


def body_kind(content_type: str | None) -> str:
    """``"multipart"`` or ``"json"`` from the Content-Type header; anything else is a 415."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return "multipart"
    if media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json")):
        return "json"
    shown = media_type or "none"
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {shown!r} is not accepted: send multipart/form-data (field 'files') "
                   "or application/json ({\"images\": [{\"data\": base64}]})")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_request", f"Content-Length {declared!r} is not a number of bytes")
        if int(declared) > max_bytes:
            raise _too_large(int(declared), max_bytes)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:  # a missing or lying Content-Length
                raise _too_large(size, max_bytes, at_least=True)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def _too_large(size: int, max_bytes: int, *, at_least: bool = False) -> ApiError:
    more = "over " if at_least else ""
    return ApiError(413, "payload_too_large",
                    f"request body of {more}{size:,} bytes exceeds the limit of {max_bytes:,} bytes (max_upload_mb)")


def _check_count(count: int, limits: Limits) -> None:
    if count == 0:
        raise ApiError(400, "empty_batch", "the request holds no images")
    if count > limits.max_images:
        raise ApiError(413, "too_many_images",
                       f"{count} images in one request, over the limit of {limits.max_images}; split the request")


# ---------------------------------------------------------------------------- multipart


async def parse_multipart(headers: Headers, body: bytes, limits: Limits) -> list[Upload]:
    """The uploads under ``files``/``file``, in order; other text fields are ignored."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(headers, stream(), max_files=limits.max_images, max_fields=_MAX_TEXT_FIELDS)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if str(e).startswith("Too many files"):
            raise ApiError(413, "too_many_images",
                           f"more than {limits.max_images} files in one request; split the request") from None
        raise ApiError(422, "invalid_request", f"malformed multipart body: {e}") from None
    try:
        uploads: list[Upload] = []
        for field, value in form.multi_items():
            if field not in IMAGE_FIELDS:
                continue
            if not isinstance(value, UploadFile):
                raise ApiError(422, "invalid_request",
                               f"multipart field {field!r} must be a file upload (a part with a filename)",
                               index=len(uploads))
            uploads.append(Upload(await value.read(), value.filename or None))
    finally:
        await form.close()
    _check_count(len(uploads), limits)
    return uploads


# ---------------------------------------------------------------------------- JSON


def parse_json(body: bytes, limits: Limits) -> tuple[list[Upload], int | None]:
    """``{"images": [{"data": base64, "name"?: str}], "top_k"?: int}`` -> uploads and top_k."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ApiError(422, "invalid_json", f"the body is not valid JSON ({reason})") from None
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid_request", f"the JSON body must be an object, not {_json_type(payload)}")
    unknown = sorted(set(payload) - {"images", "top_k"})
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown field {unknown[0]!r} (expected 'images' and 'top_k')")
    images = payload.get("images")
    if not isinstance(images, list):
        what = "is missing" if images is None else f"must be a list, not {_json_type(images)}"
        raise ApiError(422, "invalid_request", f"field 'images' {what}")
    _check_count(len(images), limits)
    top_k = payload.get("top_k")
    if top_k is not None:
        check_top_k(top_k, limits.num_classes, where="field 'top_k'")
    return [_json_image(item, index) for index, item in enumerate(images)], top_k


def _json_image(item: Any, index: int) -> Upload:
    where = f"images[{index}]"
    if not isinstance(item, dict):
        raise ApiError(422, "invalid_request", f"{where} must be an object with 'data', not {_json_type(item)}",
                       index=index)
    unknown = sorted(set(item) - {"data", "name"})
    if unknown:
        raise ApiError(422, "invalid_request", f"{where}: unknown field {unknown[0]!r} (expected 'data' and 'name')",
                       index=index)
    data, name = item.get("data"), item.get("name")
    if not isinstance(data, str):
        what = "is missing" if data is None else f"must be a base64 string, not {_json_type(data)}"
        raise ApiError(422, "invalid_request", f"{where}.data {what}", index=index)
    if name is not None and not isinstance(name, str):
        raise ApiError(422, "invalid_request", f"{where}.name must be a string, not {_json_type(name)}", index=index)
    return Upload(_b64decode(data, where, index), name)


def _b64decode(text: str, where: str, index: int) -> bytes:
    if text.startswith("data:") and "," in text[:256]:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_request", f"{where}.data is not valid base64", index=index) from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def check_top_k(value: Any, num_classes: int, *, where: str = "top_k") -> int:
    """``value`` if it is an integer in [1, num_classes], else a 422."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_classes:
        raise ApiError(422, "invalid_request",
                       f"{where} must be an integer from 1 to {num_classes} (the model's classes), not {value!r}")
    return value


# ---------------------------------------------------------------------------- decoding


def decode_uploads(uploads: list[Upload], pre: Preprocess, max_pixels: int) -> DecodedBatch:
    """Decode and resize every upload (blocking: call it in a worker thread); the first bad one is a 400."""
    pixels, sizes = [], []
    for index, upload in enumerate(uploads):
        image = _decode_one(upload, index, pre.mode, max_pixels)
        pixels.append(resize_to_input(image, pre))
        sizes.append(image.size)
    return DecodedBatch(np.stack(pixels), sizes, [upload.name for upload in uploads])


def _decode_one(upload: Upload, index: int, mode: str, max_pixels: int) -> Image.Image:
    label = f"image {index}" + (f" ({upload.name})" if upload.name else "")
    _check_pixels(upload.data, label, index, max_pixels)
    try:
        image = decode_image(upload.data, mode=mode, max_pixels=max_pixels, name=label)
    except DataError as e:
        raise ApiError(400, "bad_image", str(e), index=index) from None
    except Exception as e:  # Pillow's plugins raise more types than decode_image expects on hostile files
        logger.info("%s: undecodable (%s: %s)", label, type(e).__name__, e)
        raise ApiError(400, "bad_image", f"{label}: corrupt or unsupported image ({type(e).__name__})",
                       index=index) from None
    width, height = image.size
    if min(width, height) < MIN_SIDE_PX:
        raise ApiError(400, "bad_image",
                       f"{label}: {width}x{height} px is too small (at least {MIN_SIDE_PX} px a side)", index=index)
    return image


def _check_pixels(data: bytes, label: str, index: int, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` before decoding it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(400, "image_too_large", f"{label}: refused as a decompression bomb ({e})",
                       index=index) from None
    except Exception:  # not an image, truncated header...: decode_image says what is wrong
        return
    if width * height > max_pixels:
        raise ApiError(400, "image_too_large",
                       f"{label}: {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}",
                       index=index)


# ---------------------------------------------------------------------------- OpenAPI description

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["code", "message", "index"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                       "index": {"type": ["integer", "null"], "description": "the image at fault, if one"}},
    }},
}
_ERROR_MEANINGS = {
    400: "bad_image, image_too_large, empty_batch or bad_request",
    401: "unauthorized: no API key",
    403: "forbidden: wrong API key",
    408: "request_timeout: the body did not arrive within request_timeout_s",
    413: "payload_too_large or too_many_images",
    415: "unsupported_media_type",
    422: "invalid_json or invalid_request",
    503: "overloaded (Retry-After) or unavailable / not ready",
    504: "timeout",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for ``statuses``, all with the error body."""
    return {status: {"description": _ERROR_MEANINGS[status], "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
            for status in statuses}


def _prediction_schema(num_classes: int) -> dict[str, Any]:
    """One prediction row of the answer (the shape ``predict`` prints as a JSON line)."""
    probability = {"type": "number", "minimum": 0, "maximum": 1}
    return {
        "type": "object",
        "required": ["name", "label", "class_index", "confidence", "top_k", "guardrails"],
        "properties": {
            "name": {"type": ["string", "null"]},
            "label": {"type": "string"},
            "class_index": {"type": "integer", "minimum": 0, "maximum": num_classes - 1},
            "confidence": probability,
            "top_k": {"type": "array", "items": {"type": "object", "required": ["label", "prob"],
                                                 "properties": {"label": {"type": "string"}, "prob": probability}}},
            "guardrails": {"type": "object", "required": ["ood", "low_confidence", "input_quality", "abstain"],
                           "properties": {
                               "ood": {"anyOf": [{"type": "null"}, {
                                   "type": "object", "required": ["flag", "score", "threshold"],
                                   "properties": {"flag": {"type": "boolean"}, "score": {"type": "number"},
                                                  "threshold": {"type": "number"}}}]},
                               "low_confidence": {"type": "boolean"},
                               "input_quality": {"type": "array", "items": {"type": "string"}},
                               "abstain": {"type": "boolean"}}},
        },
    }


def predict_openapi(num_classes: int, max_images: int) -> dict[str, Any]:
    """The request bodies and the 200 answer of ``POST /v1/predict`` (the route reads its body itself)."""
    top_k = {"type": "integer", "minimum": 1, "maximum": num_classes}
    prediction = _prediction_schema(num_classes)
    answer = {
        "type": "object",
        "required": ["model", "latency_ms", "predictions"],
        "properties": {
            "model": {"type": "object", "required": ["name", "sha256", "lensforge"],
                      "properties": {"name": {"type": "string"}, "sha256": {"type": "string"},
                                     "lensforge": {"type": "string"}}},
            "latency_ms": {"type": "number", "minimum": 0},
            "predictions": {"type": "array", "items": prediction},
        },
    }
    json_body = {
        "type": "object",
        "required": ["images"],
        "additionalProperties": False,
        "properties": {
            "images": {"type": "array", "minItems": 1, "maxItems": max_images, "items": {
                "type": "object", "required": ["data"], "additionalProperties": False,
                "properties": {"data": {"type": "string", "format": "byte", "description": "base64 image file"},
                               "name": {"type": "string"}}}},
            "top_k": top_k,
        },
    }
    multipart_body = {
        "type": "object",
        "required": ["files"],
        "properties": {"files": {"type": "array", "minItems": 1, "maxItems": max_images,
                                 "items": {"type": "string", "format": "binary"}}},
    }
    return {
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": multipart_body},
            "application/json": {"schema": json_body},
        }},
        "responses": {"200": {"description": "one prediction per image, in order",
                              "content": {"application/json": {"schema": answer}}}},
    }
