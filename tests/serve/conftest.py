"""A tiny guarded bundle and the real ``lensforge serve`` running on it as a subprocess.

Servers are started once per session (one open, one with an API key) through the
console script, on a free loopback port, and stopped by their own process id.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import LENSFORGE, slow_fixture
from PIL import Image

API_KEY_ENV = "LENSFORGE_TEST_API_KEY"
API_KEY = "test-key-0123456789"
START_TIMEOUT_S = 90.0  # loading the bundle and warming up, on 2 busy cores


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"lensforge serve exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"lensforge serve not ready after {START_TIMEOUT_S:g} s:\n{server.log_tail()}")


def stop(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM this process (uvicorn shuts down gracefully), SIGKILL it if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)


@contextmanager
def running_server(bundle: Path, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``lensforge serve BUNDLE --port <free> ARGS`` until the block ends."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    full_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    command = [LENSFORGE, "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_ready(server)
        yield server
    finally:
        stop(process)


@pytest.fixture(scope="session")
def served_bundle(guarded_digits_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's guarded digits bundle: tinycnn_xs, 8 px grey, temperature, OOD detector, quality, abstention.

    A copy of ``guarded_digits_run_template``, so the servers share no folder with other tests.
    """
    run_dir = shutil.copytree(guarded_digits_run_template, tmp_path_factory.mktemp("serve") / "run")
    return Path(run_dir) / "bundle"


@slow_fixture(scope="session")
def server(served_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server with default settings and no API key."""
    with running_server(served_bundle, tmp_path_factory.mktemp("serve-logs")) as running:
        yield running


@slow_fixture(scope="session")
def auth_server(served_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second server that wants ``API_KEY`` (from the env var named by ``--api-key-env``)."""
    with running_server(served_bundle, tmp_path_factory.mktemp("serve-auth-logs"), "--api-key-env", API_KEY_ENV,
                        env={API_KEY_ENV: API_KEY}) as running:
        yield running


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def png() -> Callable[[np.ndarray], bytes]:
    """``png(uint8 array)``: PNG bytes."""
    return png_bytes


@pytest.fixture
def unused_url() -> str:
    """A loopback URL nobody listens on: connection refused."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def digits() -> list[tuple[np.ndarray, str]]:
    """12 real 8x8 digits (uint8, 0-255) with their labels, from the end of scikit-learn's set."""
    from lensforge.data import open_source

    source = open_source("builtin:digits")
    assert source.arrays is not None
    return [(source.arrays[i], source.class_names[source.records[i].target]) for i in range(-12, 0)]


@pytest.fixture(scope="session")
def digit_png(digits: list[tuple[np.ndarray, str]]) -> bytes:
    """One digit as PNG bytes: a request that must always succeed."""
    return png_bytes(digits[0][0])


@pytest.fixture(scope="session")
def predict_ok(server: Server, digit_png: bytes) -> Callable[[], None]:
    """Asserts the server is still healthy and still classifies a normal image."""

    def check() -> None:
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        response = httpx.post(server.url + "/v1/predict", files=[("files", ("ok.png", digit_png, "image/png"))],
                              timeout=30)
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == 1

    return check
