"""Deploy: export to ONNX, write and verify bundles, predict with ONNX Runtime.

Loading and predicting (:mod:`~lensforge.deploy.bundle`, :mod:`~lensforge.deploy.predict`)
never import torch, so a serving host needs only NumPy, Pillow and ONNX Runtime.
The export functions are imported from :mod:`~lensforge.deploy.export` (torch) on
first access.
"""

from __future__ import annotations

from typing import Any

from lensforge.deploy.bundle import Bundle, is_bundle, load_bundle
from lensforge.deploy.predict import find_images, predict_files

_EXPORT_NAMES = (
    "ExportResult",
    "LogitsAndFeatures",
    "check_parity",
    "export_onnx",
    "export_onnx_result",
    "write_bundle",
)

__all__ = [
    "Bundle",
    "ExportResult",
    "LogitsAndFeatures",
    "check_parity",
    "export_onnx",
    "export_onnx_result",
    "find_images",
    "is_bundle",
    "load_bundle",
    "predict_files",
    "write_bundle",
]


def __getattr__(name: str) -> Any:
    # PEP 562: import torch only when an export function is actually used
    if name in _EXPORT_NAMES:
        from lensforge.deploy import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
