"""The server's configuration: one frozen pydantic model, checked before anything starts.

Kept free of :mod:`lensforge.train` (which imports torch) so a serving host needs no torch.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lensforge.errors import ConfigError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ServeConfig(BaseModel):
    """How ``lensforge serve`` listens, batches and refuses.

    Sizes are in images unless the name says otherwise; ``max_upload_mb`` caps the whole
    request body (MB = 10**6 bytes). ``low_confidence`` None means the bundle's abstain
    threshold when it has one, else 0.5.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port (workers=1 only)
    workers: int = Field(1, ge=1, le=256)  # processes, each with its own bundle and batcher
    api_key_env: str | None = None  # name of the environment variable holding the key
    max_batch: int = Field(32, ge=1, le=4096)  # images per inference; 1 turns micro-batching off
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)  # longest the first image waits for others to join
    queue_size: int = Field(256, ge=1)  # images waiting for inference; beyond it 503 + Retry-After
    request_timeout_s: float = Field(10.0, gt=0, le=3600)  # upload parsed to answer; beyond it 504
    max_upload_mb: float = Field(10.0, gt=0, le=4096)
    max_image_pixels: int = Field(40_000_000, ge=64)  # width x height, checked before decoding
    max_images_per_request: int = Field(64, ge=1)
    top_k: int = Field(5, ge=1)
    drift_window: int = Field(1000, ge=1)  # images in the drift monitor's sliding window
    low_confidence: float | None = Field(None, ge=0, le=1)  # calibrated top probability below it

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise ValueError(f"api_key_env must be an environment variable name, not {self.api_key_env!r}")
        if self.workers > 1 and self.port == 0:
            raise ValueError("workers > 1 needs an explicit port (port 0 picks one per process)")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)


def make_serve_config(values: dict[str, Any] | None = None, *, where: str = "serve options") -> ServeConfig:
    """Build a :class:`ServeConfig`, turning validation errors into a one-line :class:`ConfigError`."""
    try:
        return ServeConfig(**(values or {}))
    except ValidationError as e:
        raise ConfigError(_format_error(e, where)) from None
    except TypeError as e:  # keyword names that are not strings
        raise ConfigError(f"{where}: {e}") from None


def _format_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "config"
    message = "unknown option" if first["type"] == "extra_forbidden" else first["msg"]
    message = message.removeprefix("Value error, ")
    value = first.get("input")
    shown = f" (got {value!r})" if first["type"] != "missing" and not isinstance(value, dict) else ""
    return f"{where}: {field}: {message}{shown}"
