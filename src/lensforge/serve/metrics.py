"""Prometheus metrics of one server app, in a registry of its own (several apps may share a process)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# seconds; from a cached 1-image answer to a request stuck behind a full queue
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)  # images per inference
OTHER_ROUTE = "other"  # label of paths that match no route, so scans of random URLs add no series


class ServeMetrics:
    """Counters, histograms and gauges of the server; :meth:`render` gives the exposition text."""

    def __init__(
        self,
        model_info: dict[str, str],
        queue_depth: Callable[[], float],
        drift_gauges: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter("lensforge_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=reg)
        self.latency = Histogram("lensforge_request_latency_seconds", "Time from request to response, per route",
                                 ["route"], buckets=LATENCY_BUCKETS_S, registry=reg)
        self.batch_size = Histogram("lensforge_batch_size_images", "Images per model inference",
                                    buckets=BATCH_BUCKETS, registry=reg)
        self.inference = Histogram("lensforge_inference_seconds", "Model and guardrail time per batch",
                                   buckets=LATENCY_BUCKETS_S, registry=reg)
        self.images = Counter("lensforge_images_predicted", "Images run through the model", registry=reg)
        self.ood = Counter("lensforge_images_ood", "Images flagged out-of-distribution", registry=reg)
        self.low_confidence = Counter("lensforge_images_low_confidence",
                                      "Images whose calibrated confidence is below the low-confidence threshold",
                                      registry=reg)
        self.detections = Counter("lensforge_detections", "Objects detected (detection bundles), by class",
                                  ["label"], registry=reg)
        self.abstained = Counter("lensforge_images_abstained", "Images the guardrails say not to trust",
                                 registry=reg)
        depth = Gauge("lensforge_queue_depth_images", "Images waiting for a batch", registry=reg)
        depth.set_function(queue_depth)
        info = Gauge("lensforge_model_info", "The served bundle (value 1)", list(model_info), registry=reg)
        info.labels(**model_info).set(1)
        if drift_gauges is not None:
            reg.register(_DriftCollector(drift_gauges))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def count_images(self, total: int, ood: int, low_confidence: int, abstained: int) -> None:
        self.images.inc(total)
        self.ood.inc(ood)
        self.low_confidence.inc(low_confidence)
        self.abstained.inc(abstained)

    def count_detections(self, labels: list[str]) -> None:
        for label in labels:
            self.detections.labels(label=label).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _DriftCollector(Collector):
    """Reads the drift monitor's gauges at scrape time: ``lensforge_drift{name=...}``."""

    def __init__(self, gauges: Callable[[], dict[str, float]]) -> None:
        self.gauges = gauges

    def describe(self) -> Iterable[Any]:
        return [GaugeMetricFamily("lensforge_drift", "Drift monitor statistics (see GET /v1/drift)",
                                  labels=["name"])]

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily("lensforge_drift", "Drift monitor statistics (see GET /v1/drift)",
                                   labels=["name"])
        for name, value in self.gauges().items():
            family.add_metric([str(name)], float(value))
        yield family


class RequestMetricsMiddleware:
    """ASGI middleware: counts every HTTP request by route and status and times it."""

    def __init__(self, app: Any, metrics: ServeMetrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else OTHER_ROUTE
        status = 500  # unless a response starts: an exception escaped every handler
        started = time.perf_counter()

        async def send_and_record(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.observe_request(route, status, time.perf_counter() - started)
