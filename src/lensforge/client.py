"""A small synchronous client for ``lensforge serve`` (httpx; no torch, no ONNX Runtime).

``Client(url).predict([path, png_bytes, uint8_array])`` uploads images as multipart form
data and returns the server's prediction rows. Every failure is a :class:`ServerError`
carrying the HTTP status and the server's error code and message on one line, so the CLI
prints it like any other lensforge error. :func:`predict_remote` gives rows shaped like
``lensforge predict`` (see :func:`lensforge.deploy.predict.predict_files`) from a server.
"""

from __future__ import annotations

import io
import mimetypes
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from lensforge.errors import DataError, LensforgeError, UsageError

PathLike = str | os.PathLike[str]
ImageInput = PathLike | bytes | np.ndarray
# Requests predict_remote sends stay under the server defaults (64 images, 10 MB a body).
REMOTE_BATCH_IMAGES = 16
REMOTE_BATCH_BYTES = 8 * 1024 * 1024


class ServerError(LensforgeError):
    """A request to a lensforge server failed: unreachable, timed out, or answered 4xx/5xx.

    Attributes:
        status: HTTP status (None when no answer came back).
        code: the server's error code (``"bad_image"``, ``"overloaded"``, ...) or None.
        index: which image of the request was at fault, when the server says so.
        retry_after_s: the server's ``Retry-After`` (seconds) on 503, else None.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 index: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.index, self.retry_after_s = status, code, index, retry_after_s


class Client:
    """Talks to one ``lensforge serve`` instance.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``X-API-Key`` when the server was started with ``--api-key-env``.
        timeout: seconds for connecting and for each read.
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ probes (never raise)

    def health(self) -> bool:
        """True when the process answers ``/healthz``; False when unreachable or unhealthy."""
        return self._probe("/healthz", "ok")

    def ready(self) -> bool:
        """True when the model is loaded and warmed up (``/readyz`` is 200)."""
        return self._probe("/readyz", "ready")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll ``/readyz`` until ready. Raises :class:`ServerError` after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServerError(f"{self.url}: server not ready after {timeout_s:g} s (is it running?)")
            time.sleep(0.1)

    def _probe(self, path: str, wanted: str) -> bool:
        try:
            response = self._http.get(path)
            return response.status_code == 200 and response.json().get("status") == wanted
        except (httpx.HTTPError, ValueError):
            return False

    # ------------------------------------------------------------------ API

    def model(self) -> dict[str, Any]:
        """The served bundle's manifest."""
        return self._json("GET", "/v1/model")

    def drift(self) -> dict[str, Any]:
        """The server's input/prediction drift report since it started."""
        return self._json("GET", "/v1/drift")

    def metrics(self) -> str:
        """Prometheus metrics text."""
        return self._request("GET", "/metrics").text

    def predict(self, images: Sequence[ImageInput], *, top_k: int | None = None) -> list[dict[str, Any]]:
        """Classify ``images`` in one request: paths, encoded bytes, or uint8 arrays HxW / HxWxC (sent as PNG).

        Returns one row per image, in order: ``{"name", "label", "class_index", "confidence",
        "top_k": [{"label", "prob"}], "guardrails": {...}}``.

        Raises:
            UsageError: no images, or an array that is not uint8 HxW(xC).
            DataError: a path that cannot be read.
            ServerError: the server refused the request or could not be reached.
        """
        if isinstance(images, (str, bytes, os.PathLike, np.ndarray)):
            images = [images]  # one image given bare, not a list
        if not images:
            raise UsageError("predict() needs at least one image")
        files = [("files", encode_upload(image, i)) for i, image in enumerate(images)]
        params = {"top_k": top_k} if top_k is not None else None
        answer = self._json("POST", "/v1/predict", files=files, params=params)
        if not isinstance(answer.get("predictions"), list):
            raise ServerError(f"POST {self.url}/v1/predict: the answer has no 'predictions' list (not lensforge?)")
        return answer["predictions"]

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        where = f"{method} {self.url}{path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as e:
            raise ServerError(f"{where}: timed out ({type(e).__name__})") from None
        except httpx.ConnectError as e:
            raise ServerError(f"{where}: cannot reach the lensforge server ({e or type(e).__name__})") from None
        except httpx.HTTPError as e:  # the connection broke mid-request
            raise ServerError(f"{where}: request failed ({type(e).__name__}: {e})") from None
        if response.status_code >= 400:
            raise error_from_response(where, response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._request(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ServerError(f"{method} {self.url}{path}: the answer is not a JSON object (not a lensforge server?)",
                              status=response.status_code)
        return body


def error_from_response(where: str, response: httpx.Response) -> ServerError:
    """A :class:`ServerError` from the JSON error body ``{"error": {"code", "message", "index"}}``."""
    code = index = None
    try:
        error = response.json()["error"]
        code, message, index = error.get("code"), str(error.get("message", "")), error.get("index")
    except (ValueError, KeyError, TypeError, AttributeError):  # not a lensforge error body (a proxy?)
        message = " ".join(response.text.split())[:200] or response.reason_phrase
    retry_after = response.headers.get("retry-after")
    try:
        retry_after_s = float(retry_after) if retry_after is not None else None
    except ValueError:
        retry_after_s = None
    image = f" (image {index})" if index is not None else ""
    label = f"{response.status_code} {code}" if code else str(response.status_code)
    return ServerError(f"{where}: {label}{image}: {message}", status=response.status_code, code=code,
                       index=index if isinstance(index, int) else None, retry_after_s=retry_after_s)


def encode_upload(image: ImageInput, index: int) -> tuple[str, bytes, str]:
    """``(filename, bytes, content type)`` for one multipart part; arrays become PNG."""
    if isinstance(image, np.ndarray):
        return f"image{index}.png", png_bytes(image), "image/png"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image{index}", bytes(image), "application/octet-stream"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
        return path.name, data, mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    raise UsageError(f"image {index}: expected a path, bytes or a uint8 array, not {type(image).__name__}")


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of a uint8 HxW or HxWxC (C = 1, 3 or 4) array."""
    from PIL import Image

    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise UsageError(f"arrays must be uint8 HxW or HxWxC with C in 1/3/4, not {array.dtype} {array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------- lensforge predict --url


def predict_remote(url: str, paths: PathLike | Iterable[PathLike], *, api_key: str | None = None,
                   top_k: int = 5, on_bad_image: str = "fail", timeout: float = 60.0) -> Iterator[dict[str, Any]]:
    """Yield rows like ``lensforge predict``, classifying the files on a server.

    Rows are ``{"path", "label", "class_index", "confidence", "top_k"}`` plus ``"ood"``,
    ``"ood_score"``, ``"quality"`` and ``"abstain"`` when the served bundle has those
    guardrails; with ``on_bad_image="skip"`` a file the server refuses as an image gives
    ``{"path", "error"}``. Files go in requests of at most 16 images and ~8 MB, in order.
    Paths are checked before the first row.

    Raises:
        DataError: a missing path, or a folder with no images.
        ServerError: the server refused a file (the message names it) or could not be reached.
    """
    if on_bad_image not in ("fail", "skip"):
        raise UsageError(f"on_bad_image must be 'fail' or 'skip', not {on_bad_image!r}")
    if top_k < 1:
        raise UsageError(f"top_k must be >= 1 (got {top_k})")
    from lensforge.data.decode import find_images

    files = find_images(paths)
    return _remote_rows(url, files, api_key=api_key, top_k=top_k, skip=on_bad_image == "skip", timeout=timeout)


def _remote_rows(url: str, files: list[Path], *, api_key: str | None, top_k: int, skip: bool,
                 timeout: float) -> Iterator[dict[str, Any]]:
    with Client(url, api_key=api_key, timeout=timeout) as client:
        for chunk in _chunks(files):
            yield from _chunk_rows(client, chunk, top_k, skip)


def _chunk_rows(client: Client, chunk: list[Path], top_k: int, skip: bool) -> list[dict[str, Any]]:
    if not chunk:
        return []
    try:
        predictions = client.predict(chunk, top_k=top_k)
    except ServerError as e:
        if e.index is None or not 0 <= e.index < len(chunk):
            raise
        bad = chunk[e.index]
        if not skip or e.status != 400:
            raise ServerError(f"{bad}: {e}", status=e.status, code=e.code, index=e.index) from None
        # the server refuses the whole request for one image: send the others again without it
        return [*_chunk_rows(client, chunk[: e.index], top_k, skip), {"path": str(bad), "error": str(e)},
                *_chunk_rows(client, chunk[e.index + 1:], top_k, skip)]
    return [local_style_row(path, prediction) for path, prediction in zip(chunk, predictions)]


def local_style_row(path: Path, prediction: dict[str, Any]) -> dict[str, Any]:
    """A server prediction reshaped as a ``lensforge predict`` row (flat guardrail fields)."""
    row = {"path": str(path), **{k: prediction[k] for k in ("label", "class_index", "confidence", "top_k")}}
    guardrails = prediction.get("guardrails") or {}
    ood = guardrails.get("ood")
    if ood is not None:
        row["ood"], row["ood_score"] = bool(ood["flag"]), float(ood["score"])
    if guardrails.get("input_quality") is not None:
        row["quality"] = list(guardrails["input_quality"])
    if guardrails.get("abstain") is not None:
        row["abstain"] = bool(guardrails["abstain"])
    return row


def _chunks(files: list[Path]) -> Iterator[list[Path]]:
    chunk: list[Path] = []
    size = 0
    for path in files:
        file_size = path.stat().st_size
        if chunk and (len(chunk) == REMOTE_BATCH_IMAGES or size + file_size > REMOTE_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(path)
        size += file_size
    if chunk:
        yield chunk


