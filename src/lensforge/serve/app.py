"""The HTTP server: a FastAPI app around one verified bundle, micro-batched, guarded and measured.

Nothing here imports torch: the bundle runs on ONNX Runtime, the guardrails and the drift
monitor on NumPy. Every refused request gets ``{"error": {"code", "message", "index"}}``
with a 4xx status; an unexpected failure is a logged 500 of the same shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import lensforge
from lensforge.deploy.bundle import MODEL_FILE, Bundle, load_bundle
from lensforge.deploy.guardrails import guardrails_for
from lensforge.errors import UsageError
from lensforge.serve.batcher import Batcher, BatcherClosed, Overloaded, TimedOut
from lensforge.serve.config import ServeConfig
from lensforge.serve.metrics import RequestMetricsMiddleware, ServeMetrics
from lensforge.serve.requests import (
    ApiError,
    DecodedBatch,
    Limits,
    Upload,
    body_kind,
    decode_uploads,
    error_body,
    error_responses,
    parse_json,
    parse_multipart,
    predict_openapi,
    read_body,
)
from lensforge.tasks import get_task

logger = logging.getLogger("lensforge.serve")

BUNDLE_ENV = "LENSFORGE_SERVE_BUNDLE"  # how run_server hands the bundle to worker processes
CONFIG_ENV = "LENSFORGE_SERVE_CONFIG"  # ... and the ServeConfig, as JSON
DEFAULT_LOW_CONFIDENCE = 0.5  # without an abstain threshold in the bundle
GUARDRAIL_KEYS = ("ood", "ood_score", "quality", "abstain")  # what Guardrails.check adds to a prediction row
DECODE_THREADS = max(2, min(8, os.cpu_count() or 1))  # concurrent image decodes, each up to max_image_pixels
ROUTES = ("/healthz", "/readyz", "/v1/model", "/v1/drift", "/metrics", "/v1/predict")


class ModelService:
    """The bundle, its guardrails, the drift monitor, the batcher and the metrics of one app."""

    def __init__(self, bundle_path: str | os.PathLike[str], cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.api_key = _api_key(cfg)
        # verifies every file's SHA-256; no spinning ORT threads: the cores are shared with HTTP handling
        self.bundle: Bundle = load_bundle(bundle_path, spin=False)
        self.guardrails = guardrails_for(self.bundle)
        self.task = get_task(self.bundle.task)
        self.class_index = {name: i for i, name in enumerate(self.bundle.class_names)}
        abstain = self.guardrails.abstain if self.guardrails is not None else None
        self.low_confidence = (cfg.low_confidence if cfg.low_confidence is not None
                               else abstain.threshold if abstain is not None else DEFAULT_LOW_CONFIDENCE)
        self.drift, self.drift_reason = _drift_monitor(self.bundle, cfg.drift_window)
        manifest = self.bundle.manifest
        self.model_info = {
            "name": str(manifest.get("model") or self.bundle.path.name),
            "sha256": str(manifest["files"][MODEL_FILE]["sha256"]),
            "lensforge": lensforge.__version__,
        }
        self.metrics = ServeMetrics(self.model_info, lambda: self.batcher.queue_depth,
                                    self.drift.gauges if self.drift is not None else None)
        self.batcher = Batcher(self.infer, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                               queue_size=cfg.queue_size, on_batch=self.metrics.observe_batch)
        self.limits = Limits(cfg.max_upload_bytes, min(cfg.max_images_per_request, cfg.queue_size),
                             cfg.max_image_pixels, self.bundle.num_classes)
        self.warmup_ms: float | None = None
        self.warmup_error: str | None = None
        self._decoder: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ inference (worker thread)

    def run_model(self, images: np.ndarray, sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """The task's prediction rows (:meth:`lensforge.tasks.Task.predict_batch`) and guardrail verdicts.

        One dict per image: ``row`` (what ``predict`` prints, without the guardrail keys), ``probs``
        (a classifier's calibrated probabilities, for the drift monitor; None for other tasks) and
        the verdicts. Low confidence is a classifier's: its top probability under the threshold.
        """
        rows = self.task.predict_batch(self.bundle, images, sizes, guardrails=self.guardrails,
                                       top_k=self.bundle.num_classes)
        ood_threshold = self.guardrails.ood.threshold if self.guardrails and self.guardrails.ood else None
        results = []
        for row in rows:
            check = {key: row.pop(key) for key in GUARDRAIL_KEYS if key in row}
            low_confidence = bool(row.get("confidence", 1.0) < self.low_confidence)
            ood = ({"flag": check["ood"], "score": check["ood_score"], "threshold": ood_threshold}
                   if "ood" in check else None)
            quality = check.get("quality", [])
            results.append({
                "row": row,
                "probs": self._probs(row),
                "ood": ood,
                "low_confidence": low_confidence,
                "input_quality": quality,
                "abstain": bool((ood and ood["flag"]) or low_confidence or quality or check.get("abstain", False)),
            })
        return results

    def _probs(self, row: dict[str, Any]) -> np.ndarray | None:
        """A classifier row's full probability vector (its top_k lists every class here), else None."""
        if "top_k" not in row:
            return None
        probs = np.zeros(self.bundle.num_classes)
        for entry in row["top_k"]:
            probs[self.class_index[entry["label"]]] = entry["prob"]
        return probs

    def infer(self, images: np.ndarray, sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """:meth:`run_model`, counted in the metrics and fed to the drift monitor (the batcher's infer)."""
        results = self.run_model(images, sizes)
        ood = [r["ood"]["flag"] for r in results if r["ood"] is not None]
        self.metrics.count_images(len(results), sum(ood), sum(r["low_confidence"] for r in results),
                                  sum(r["abstain"] for r in results))
        self.metrics.count_detections([d["label"] for r in results for d in r["row"].get("detections", [])])
        if self.drift is not None and all(r["probs"] is not None for r in results):
            flags = np.array(ood, dtype=bool) if len(ood) == len(results) else None
            try:
                self.drift.update(images, np.stack([r["probs"] for r in results]), flags)
            except Exception:  # monitoring must never cost a prediction
                logger.exception("drift monitor update failed; predictions are unaffected")
        return results

    def prediction(self, result: dict[str, Any], name: str | None, top_k: int) -> dict[str, Any]:
        row = dict(result["row"])
        if "top_k" in row:
            row["top_k"] = row["top_k"][:top_k]
        return {
            "name": name,
            **row,
            "guardrails": {key: result[key] for key in ("ood", "low_confidence", "input_quality", "abstain")},
        }

    # ------------------------------------------------------------------ life cycle (event loop)

    async def start(self) -> None:
        # decoding gets its own few threads: a flood of large images then holds at most that many
        # decoded at once, instead of one per thread of the default pool
        self._decoder = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="lensforge-decode")
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
            self._decoder = None

    async def decode(self, uploads: list[Upload]) -> DecodedBatch:
        """Decode and resize a request's images off the event loop."""
        if self._decoder is None:
            raise ApiError(503, "unavailable", "the server is not running (starting or shutting down)",
                           headers={"Retry-After": "1"})
        pre, max_pixels = self.bundle.preprocess, self.cfg.max_image_pixels
        return await asyncio.get_running_loop().run_in_executor(
            self._decoder, decode_uploads, uploads, pre, max_pixels)

    async def warm_up(self) -> None:
        """One inference on a zero batch: creates the ONNX Runtime session before the first request."""
        pre = self.bundle.preprocess
        zeros = np.zeros((1, pre.channels, *pre.input_size), np.uint8)
        started = time.perf_counter()
        try:
            await self.batcher.run_in_worker(lambda: self.run_model(zeros, [pre.input_size[::-1]]))
        except Exception as e:  # the server stays up (healthz) but never ready
            self.warmup_error = f"{type(e).__name__}: {e}"
            logger.error("bundle %s: warm-up inference failed (%s)", self.bundle.path, self.warmup_error)
            return
        self.warmup_ms = (time.perf_counter() - started) * 1000.0

    @property
    def ready(self) -> bool:
        return self.warmup_ms is not None


def _api_key(cfg: ServeConfig) -> str | None:
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if not key.strip():
        raise UsageError(f"api_key_env names {cfg.api_key_env}, but that environment variable is "
                         f"{'empty' if cfg.api_key_env in os.environ else 'not set'}; set it to the API key")
    return key


def _drift_monitor(bundle: Bundle, window: int) -> tuple[Any, str | None]:
    """(monitor, None), or (None, why drift is off)."""
    try:
        from lensforge.serve.drift import DriftMonitor
    except ImportError:
        return None, "this lensforge has no drift monitor"
    monitor = DriftMonitor.from_bundle(bundle, window=window)  # a damaged reference raises ArtifactError
    if monitor is None:
        return None, "the bundle has no drift reference (fit one with: lensforge guard RUN)"
    return monitor, None


# ---------------------------------------------------------------------------- the app


def create_app(bundle_path: str | os.PathLike[str], cfg: ServeConfig | None = None) -> FastAPI:
    """The server app for one bundle; the bundle is loaded and its files verified now.

    Raises:
        ArtifactError: the bundle is missing, altered or damaged (guardrails and drift reference too).
        UsageError: ``cfg.api_key_env`` names an unset or empty environment variable.
    """
    cfg = cfg or ServeConfig()
    service = ModelService(bundle_path, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        warm_up = asyncio.create_task(service.warm_up())  # /healthz answers meanwhile; /readyz says loading
        try:
            yield
        finally:
            warm_up.cancel()
            await service.stop()

    app = FastAPI(title="lensforge serve", version=lensforge.__version__, lifespan=lifespan,
                  summary=f"Image classification with {service.model_info['name']}: "
                          "calibrated probabilities, OOD, input-quality and drift guardrails.")
    app.state.service = service
    _add_error_handlers(app)
    _add_probe_routes(app, service)
    _add_predict_route(app, service)
    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics, routes=ROUTES)
    return app


def _require_key(service: ModelService) -> Any:
    async def check(request: Request) -> None:
        if service.api_key is None:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        if given is None:
            raise ApiError(401, "unauthorized", "an API key is required: send X-API-Key or Authorization: Bearer",
                           headers={"WWW-Authenticate": "Bearer"})
        # compare the raw header bytes (latin-1 round-trips them) in constant time
        if not hmac.compare_digest(given.encode("latin-1", "replace"), service.api_key.encode("utf-8")):
            raise ApiError(403, "forbidden", "the API key is not valid")

    return Depends(check)


def _add_probe_routes(app: FastAPI, service: ModelService) -> None:
    auth = [_require_key(service)]

    @app.get("/healthz", tags=["probes"], responses=error_responses(), summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    not_ready = {"description": "loading (or failed: see reason)", "content": {"application/json": {"schema": {
        "type": "object", "required": ["status"],
        "properties": {"status": {"type": "string"}, "reason": {"type": "string"}}}}}}

    @app.get("/readyz", tags=["probes"], responses={503: not_ready}, summary="The model is loaded and warm")
    async def readyz() -> Response:
        if not service.ready:
            body: dict[str, Any] = {"status": "loading"}
            if service.warmup_error:
                body = {"status": "failed", "reason": service.warmup_error}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ready", "model": service.model_info["name"],
                             "warmup_ms": service.warmup_ms})

    @app.get("/v1/model", tags=["model"], dependencies=auth, responses=error_responses(401, 403),
             summary="The bundle's manifest")
    async def model() -> dict[str, Any]:
        return service.bundle.manifest

    @app.get("/v1/drift", tags=["model"], dependencies=auth, responses=error_responses(401, 403),
             summary="Drift of recent inputs and predictions from the bundle's validation reference")
    async def drift() -> dict[str, Any]:
        if service.drift is None:
            return {"enabled": False, "reason": service.drift_reason}
        return await run_in_threadpool(service.drift.report)

    @app.get("/metrics", tags=["probes"], dependencies=auth, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"},
        **error_responses(401, 403)}, response_class=Response, summary="Prometheus metrics")
    async def metrics() -> Response:
        text, content_type = service.metrics.render()
        return Response(text, media_type=content_type)


def _add_predict_route(app: FastAPI, service: ModelService) -> None:
    cfg, num_classes = service.cfg, service.bundle.num_classes

    @app.post("/v1/predict", tags=["model"], dependencies=[_require_key(service)],
              responses=error_responses(400, 401, 403, 408, 413, 415, 422, 503, 504),
              openapi_extra=predict_openapi(num_classes, service.limits.max_images),
              summary="Classify images: multipart files or JSON base64")
    async def predict(
        request: Request,
        top_k: int | None = Query(None, ge=1, le=num_classes, description="labels per prediction"),
    ) -> JSONResponse:
        started = time.perf_counter()
        if service.warmup_error:
            raise ApiError(503, "unavailable", "the model failed to load; see the server log",
                           headers={"Retry-After": "60"})
        kind = body_kind(request.headers.get("content-type"))
        try:  # a client trickling its upload must not hold the slot forever
            body = await asyncio.wait_for(read_body(request, service.limits.max_body_bytes), cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, "request_timeout", f"the request body did not arrive within request_timeout_s = "
                                                   f"{cfg.request_timeout_s:g} s") from None
        if kind == "json":
            uploads, body_top_k = await run_in_threadpool(parse_json, body, service.limits)
            top_k = body_top_k if body_top_k is not None else top_k
        else:
            uploads = await parse_multipart(request.headers, body, service.limits)
        batch = await service.decode(uploads)
        remaining_s = cfg.request_timeout_s - (time.perf_counter() - started)
        try:
            results = await service.batcher.submit(batch.images, batch.sizes, remaining_s)
        except Overloaded as e:
            raise ApiError(503, "overloaded", f"server busy: {e}; retry later",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except TimedOut:
            raise ApiError(504, "timeout",
                           f"no answer within request_timeout_s = {cfg.request_timeout_s:g} s") from None
        except BatcherClosed as e:
            raise ApiError(503, "unavailable", str(e), headers={"Retry-After": "1"}) from None
        k = top_k if top_k is not None else min(cfg.top_k, num_classes)
        predictions = [service.prediction(r, name, k) for r, name in zip(results, batch.names)]
        return JSONResponse({"model": service.model_info, "latency_ms": (time.perf_counter() - started) * 1000.0,
                             "predictions": predictions})


# ---------------------------------------------------------------------------- errors

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = {404: f"no route {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(
                       exc.status_code, str(exc.detail))
        return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = " ".join(str(part) for part in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}"
        if "input" in first and not isinstance(first["input"], (dict, list)):
            message += f" (got {first['input']!r})"
        return JSONResponse(error_body("invalid_request", message), status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal server error; see the server log"),
                            status_code=500)


# ---------------------------------------------------------------------------- running it


def app_from_env() -> FastAPI:
    """The app factory of each uvicorn worker (``workers > 1``): reads :data:`BUNDLE_ENV` and :data:`CONFIG_ENV`."""
    from lensforge.serve.config import make_serve_config

    try:
        bundle, values = os.environ[BUNDLE_ENV], json.loads(os.environ.get(CONFIG_ENV, "{}"))
    except (KeyError, ValueError) as e:
        raise UsageError(f"app_from_env needs {BUNDLE_ENV} and {CONFIG_ENV} (JSON) set by run_server ({e})") from None
    return create_app(bundle, make_serve_config(values, where=CONFIG_ENV))


def run_server(bundle_path: str | os.PathLike[str], cfg: ServeConfig | None = None) -> None:
    """Serve the bundle until interrupted (uvicorn; SIGINT/SIGTERM shut down gracefully).

    The bundle is verified and the port bound before the one line with the URL is printed;
    ``GET /readyz`` says when the warm-up inference has run.

    Raises:
        ArtifactError: a damaged bundle.
        UsageError: an unset API key variable, or an address that cannot be bound.
    """
    try:
        import uvicorn
    except ImportError as e:
        raise UsageError("lensforge serve needs uvicorn: pip install 'lensforge[serve]'") from e

    cfg = cfg or ServeConfig()
    app = create_app(bundle_path, cfg)  # fails here, before any port is taken, on a bad bundle or key
    sock = _bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    workers = f"{cfg.workers} worker{'s' if cfg.workers > 1 else ''}"
    print(f"lensforge serve: {url} (bundle {bundle_path}, {workers}; GET /readyz says when ready)", flush=True)
    options: dict[str, Any] = {"log_level": "info", "access_log": False, "timeout_graceful_shutdown": 10}
    if cfg.workers == 1:
        uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[sock])
        return
    # uvicorn starts worker processes from an import string; each builds its own app and batcher
    sock.close()
    os.environ[BUNDLE_ENV] = str(Path(bundle_path).resolve())
    os.environ[CONFIG_ENV] = cfg.model_dump_json()
    uvicorn.run("lensforge.serve.app:app_from_env", factory=True, host=cfg.host, port=cfg.port,
                workers=cfg.workers, **options)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock
