"""Load test of ``lensforge serve`` on loopback: dynamic micro-batching vs one inference per request.

Issue aims: with batching (default ``--max-batch 32 --max-wait-ms 5``) at least 3x the
throughput of ``--max-batch 1``, batching p99 latency at most 50 ms, and no 5xx at all.

- **servers**: two ``lensforge serve`` processes on the same bundle, side by side on free
  loopback ports (1 worker each): ``batched`` (defaults) and ``unbatched`` (``--max-batch 1``);
- **load**: an async httpx client keeps ``--concurrency`` requests in flight, one PNG image
  per request (real digits, rotating), ``--requests`` per server in all, sent *interleaved*
  in rounds (batched, unbatched, unbatched, batched, ...) so load drift on a shared machine
  hits both; a warm-up round per server is not counted;
- **measure**: throughput (req/s) and p50/p99 latency per server over all rounds; the
  throughput ratio is the median of per-round ratios; errors by status; server RSS
  (``VmRSS`` of the server process) after warm-up and after the soak: its growth.

Caveat: on a 2-core machine the load generator (Python, one core at best) competes with
the server for the same cores, so absolute figures understate the server; both servers
pay the same tax, which is why the ratio is the figure to read.

    .venv/bin/python benchmarks/serve_load.py [--bundle B] [--requests 10000] [--concurrency 32]
"""

from __future__ import annotations

import _common  # first: sets OMP_WAIT_POLICY before torch loads  # isort: skip

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

AIM_RATIO = 3.0
AIM_P99_MS = 50.0
ROUNDS = 4  # per server; each round sends requests / ROUNDS
RECIPE = _common.recipe("tinycnn_s", data="builtin:digits", size=16, epochs=30, test_fraction=0.3)
CONFIGS = {"batched": [], "unbatched": ["--max-batch", "1"]}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="Serve this bundle (default: train tinycnn_s).")
    parser.add_argument("--requests", type=int, default=10_000, help="Requests per server, warm-up excluded.")
    parser.add_argument("--concurrency", type=int, default=32, help="Requests in flight.")
    parser.add_argument("--client", choices=("httpx", "raw"), default="raw",
                        help="httpx.AsyncClient, or pre-built requests on asyncio streams (much less client CPU).")
    parser.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


# ---------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log: Path

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        """Resident memory of the server process (VmRSS), MB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lensforge() -> str:
    import shutil
    import sys

    return shutil.which("lensforge", path=str(Path(sys.executable).parent)) or "lensforge"


@contextmanager
def serving(bundle: Path, name: str, args: list[str], log_dir: Path) -> Iterator[Server]:
    """``lensforge serve`` as a subprocess until the block ends; stopped by its own pid."""
    from lensforge.client import Client

    port = _free_port()
    log = log_dir / f"{name}.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [_lensforge(), "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    server = Server(name, f"http://127.0.0.1:{port}", process, log)
    try:
        with Client(server.url) as client:
            deadline = time.monotonic() + 120
            while not client.ready():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{name} server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(15)


# ---------------------------------------------------------------------------- load


@dataclass
class Load:
    """Latencies (ms) and outcomes of one batch of requests."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)  # HTTP status, or an exception name
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0  # the load generator's own CPU: on 2 cores it competes with the server

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def extend(self, other: Load) -> None:
        self.latencies_ms += other.latencies_ms
        self.statuses.update(other.statuses)
        self.wall_s += other.wall_s
        self.server_cpu_s += other.server_cpu_s
        self.client_cpu_s += other.client_cpu_s


async def _send_httpx(url: str, images: list[bytes], n: int, concurrency: int, load: Load) -> None:
    import httpx

    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            files = [("files", (f"{i}.png", images[i % len(images)], "image/png"))]
            start = time.perf_counter()
            try:
                response = await client.post(url + "/v1/predict", files=files)
                load.statuses[response.status_code] += 1
            except httpx.HTTPError as e:
                load.statuses[type(e).__name__] += 1
                continue
            load.latencies_ms.append((time.perf_counter() - start) * 1000)

    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


def raw_request(host: str, image: bytes, index: int) -> bytes:
    """A complete keep-alive ``POST /v1/predict`` with one multipart PNG, as bytes."""
    body = (b"--lfbound\r\nContent-Disposition: form-data; name=\"files\"; filename=\"%d.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" % index + image + b"\r\n--lfbound--\r\n")
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=lfbound"
            f"\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _send_raw(url: str, images: list[bytes], n: int, concurrency: int, load: Load) -> None:
    """Pre-built requests over plain asyncio streams: ~10x less client CPU than httpx per request."""
    parts = urlsplit(url)
    requests = [raw_request(parts.netloc, image, i) for i, image in enumerate(images)]
    counter = iter(range(n))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            for i in counter:
                start = time.perf_counter()
                writer.write(requests[i % len(requests)])
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                    await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError, IndexError) as e:
                    load.statuses[type(e).__name__] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                    continue
                load.statuses[int(head.split(b" ", 2)[1])] += 1
                load.latencies_ms.append((time.perf_counter() - start) * 1000)
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def send(server: Server, images: list[bytes], n: int, concurrency: int, client: str) -> Load:
    """``n`` requests with ``concurrency`` in flight; wall time and both sides' CPU time measured."""
    sender = _send_raw if client == "raw" else _send_httpx
    load = Load()
    server_cpu, client_cpu, start = server.cpu_s(), time.process_time(), time.perf_counter()
    asyncio.run(sender(server.url, images, n, concurrency, load))
    load.wall_s = time.perf_counter() - start
    load.server_cpu_s, load.client_cpu_s = server.cpu_s() - server_cpu, time.process_time() - client_cpu
    return load


# ---------------------------------------------------------------------------- server-side view (/metrics)


def scrape(url: str) -> dict[str, Any]:
    """The predict route's latency histogram (cumulative counts by upper bound, s) and batch-size totals."""
    import httpx

    buckets: dict[float, float] = {}
    batches = {"sum": 0.0, "count": 0.0}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("lensforge_request_latency_seconds_bucket") and 'route="/v1/predict"' in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
        elif line.startswith("lensforge_batch_size_images_sum"):
            batches["sum"] = float(line.split()[-1])
        elif line.startswith("lensforge_batch_size_images_count"):
            batches["count"] = float(line.split()[-1])
    return {"latency_buckets": buckets, "batches": batches}


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """Prometheus-style quantile (linear within a bucket) of the requests between two scrapes, in ms."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower * 1000
            return 1000 * (lower + (bound - lower) * (rank - below) / max(cumulative - below, 1e-9))
        lower, below = bound, cumulative
    return None


def digit_pngs(size: int, count: int = 64) -> list[bytes]:
    """Real digits upscaled to the bundle's input size, as PNG (the server decodes and resizes)."""
    from PIL import Image

    from lensforge.data import open_source

    arrays = open_source("builtin:digits").arrays
    assert arrays is not None
    out = []
    for array in arrays[-count:]:
        buffer = io.BytesIO()
        Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


# ---------------------------------------------------------------------------- report


def summary(load: Load) -> dict[str, Any]:
    latencies = np.asarray(load.latencies_ms)
    return {"requests": sum(load.statuses.values()), "ok": load.ok,
            "throughput_rps": load.ok / load.wall_s if load.wall_s else 0.0,
            "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
            "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
            "server_cpu_ms_per_request": 1000 * load.server_cpu_s / max(load.ok, 1),
            "client_cpu_ms_per_request": 1000 * load.client_cpu_s / max(load.ok, 1),
            "statuses": {str(k): v for k, v in sorted(load.statuses.items(), key=str)}}


def run_rounds(servers: dict[str, Server], images: list[bytes], args: argparse.Namespace
               ) -> tuple[dict[str, Load], list[float]]:
    per_round = max(1, args.requests // ROUNDS)
    totals = {name: Load() for name in servers}
    ratios = []
    for r in range(ROUNDS):
        names = list(servers) if r % 2 == 0 else list(reversed(servers))
        throughput = {}
        for name in names:
            load = send(servers[name], images, per_round, args.concurrency, args.client)
            totals[name].extend(load)
            throughput[name] = load.ok / load.wall_s
            p99 = np.percentile(load.latencies_ms, 99) if load.latencies_ms else float("nan")
            print(f"  round {r + 1}/{ROUNDS} {name:<9} {throughput[name]:7.1f} req/s  p99 {p99:6.1f} ms  "
                  f"load {_common.load_average()}  {dict(load.statuses)}", flush=True)
        ratios.append(throughput["batched"] / max(throughput["unbatched"], 1e-9))
    return totals, ratios


def server_side(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the server itself saw between two scrapes: latency quantiles and the mean batch size."""
    images = after["batches"]["sum"] - before["batches"]["sum"]
    batches = after["batches"]["count"] - before["batches"]["count"]
    return {"server_p50_ms": histogram_quantile(0.5, before["latency_buckets"], after["latency_buckets"]),
            "server_p99_ms": histogram_quantile(0.99, before["latency_buckets"], after["latency_buckets"]),
            "mean_batch_images": images / batches if batches else None}


def main() -> None:
    from lensforge.deploy.bundle import is_bundle, load_bundle
    from lensforge.deploy.from_run import export_run

    args = parse()
    info = _common.machine()
    _common.print_header("lensforge serve under load: micro-batching vs one inference per request", info)
    bundle = args.bundle
    if bundle is None:
        trained = _common.trained_run(RECIPE, args.workdir)
        bundle = trained.path / "bundle"
        if not is_bundle(bundle):
            export_run(trained.path)
    size = load_bundle(bundle).preprocess.input_size[0]
    images = digit_pngs(size)
    print(f"bundle {bundle} ({size} px); {args.requests} requests per server, concurrency {args.concurrency}, "
          f"{ROUNDS} interleaved rounds, {args.client} client", flush=True)
    with tempfile.TemporaryDirectory() as logs, \
            serving(bundle, "batched", CONFIGS["batched"], Path(logs)) as batched, \
            serving(bundle, "unbatched", CONFIGS["unbatched"], Path(logs)) as unbatched:
        servers = {"batched": batched, "unbatched": unbatched}
        for server in servers.values():  # warm-up: connections, allocator, ORT arenas
            send(server, images, min(500, args.requests), args.concurrency, args.client)
        rss_start = {name: s.rss_mb() for name, s in servers.items()}
        scraped = {name: scrape(s.url) for name, s in servers.items()}
        load_before = _common.load_average()
        totals, ratios = run_rounds(servers, images, args)
        rss_end = {name: s.rss_mb() for name, s in servers.items()}
        seen = {name: server_side(scraped[name], scrape(s.url)) for name, s in servers.items()}
        load_after = _common.load_average()
        tracebacks = {name: s.log.read_text(errors="replace").count("Traceback") for name, s in servers.items()}
    results = {name: {**summary(load), **seen[name], "rss_mb_start": rss_start[name], "rss_mb_end": rss_end[name],
                      "rss_growth_mb": rss_end[name] - rss_start[name], "tracebacks_in_log": tracebacks[name]}
               for name, load in totals.items()}
    report(results, ratios, load_before, load_after)
    _common.write_json(args.json, {"machine": info, "bundle": str(bundle), "requests": args.requests,
                                   "concurrency": args.concurrency, "client": args.client, "rounds": ROUNDS,
                                   "results": results, "throughput_ratio_per_round": ratios,
                                   "load_avg_1min": [load_before, load_after]})


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def report(results: dict[str, dict[str, Any]], ratios: list[float], load_before: float, load_after: float) -> None:
    print(f"\n{'server':<10} {'req/s':>7} {'p50/p99 ms':>13} {'server p50/p99':>15} {'batch':>5} "
          f"{'CPU ms/req srv+cli':>18} {'RSS MB start->end':>17}  statuses")
    for name, r in results.items():
        cpu = f"{r['server_cpu_ms_per_request']:.2f} + {r['client_cpu_ms_per_request']:.2f}"
        print(f"{name:<10} {r['throughput_rps']:7.1f} {_ms(r['p50_ms']):>6}/{_ms(r['p99_ms']):<6} "
              f"{_ms(r['server_p50_ms']):>7}/{_ms(r['server_p99_ms']):<7} {r['mean_batch_images'] or 0:5.1f} "
              f"{cpu:>18} {r['rss_mb_start']:7.1f} -> {r['rss_mb_end']:6.1f}  {r['statuses']}")
    ratio = statistics.median(ratios)
    server_errors = sum(v for r in results.values() for k, v in r["statuses"].items() if k.startswith("5"))
    other_errors = sum(v for r in results.values() for k, v in r["statuses"].items() if k != "200")
    batched = results["batched"]
    growth = ", ".join(f"{name} {r['rss_growth_mb']:+.1f} MB" for name, r in results.items())
    print(f"\nthroughput batched / unbatched: {ratio:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}); "
          f"RSS growth over the soak: {growth}; load average {load_before} -> {load_after}")
    print("p50/p99: seen by the client (includes its own queueing); server: the app's latency histogram")
    checks = [(f"throughput ratio >= {AIM_RATIO:g}x", ratio >= AIM_RATIO, f"{ratio:.2f}x"),
              (f"batched p99 <= {AIM_P99_MS:g} ms", batched["p99_ms"] <= AIM_P99_MS,
               f"{batched['p99_ms']:.1f} ms end to end, {_ms(batched['server_p99_ms'])} ms in the server"),
              ("zero 5xx", server_errors == 0, f"{server_errors} 5xx, {other_errors} non-200 in all")]
    for label, met, value in checks:
        print(f"aim {label:<28} {'met' if met else 'NOT met'} ({value})")


if __name__ == "__main__":
    main()
