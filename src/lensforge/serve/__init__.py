"""Serve a bundle over HTTP: micro-batched ONNX Runtime inference with guardrails, drift and metrics.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, python-multipart); never torch.
The configuration imports without it; :func:`create_app` and :func:`run_server` load the
server modules on first use and say how to install them when they are missing.

    from lensforge.serve import make_serve_config, run_server
    run_server("runs/autopilot/bundle", make_serve_config({"port": 8080, "max_batch": 16}))
"""

from __future__ import annotations

from typing import Any

from lensforge.errors import UsageError
from lensforge.serve.config import ServeConfig, make_serve_config

__all__ = ["ServeConfig", "create_app", "make_serve_config", "run_server"]

_APP_NAMES = ("create_app", "run_server")
_SERVE_EXTRA = ("fastapi", "starlette", "uvicorn", "prometheus_client", "multipart", "python_multipart")


def __getattr__(name: str) -> Any:
    # PEP 562: the web stack is imported only when a server is built
    if name in _APP_NAMES:
        try:
            from lensforge.serve import app
        except ImportError as e:
            if (e.name or "").split(".")[0] in _SERVE_EXTRA:
                raise UsageError(f"lensforge serve needs {e.name}: pip install 'lensforge[serve]'") from e
            raise
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
