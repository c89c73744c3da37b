"""Data sources, safe decoding, splits and the in-memory image table.

``open_source("builtin:digits")`` or a folder / CSV / JSONL path gives a
:class:`Source`; :func:`load_table` decodes it once into uint8 tensors sized for
the model; :func:`make_splits` assigns stratified, seeded train/val/test splits.
Names are imported lazily so the torch-free predict path stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SOURCES": "sources", "SampleRecord": "sources", "Source": "sources", "list_sources": "sources",
    "open_source": "sources", "ImageTable": "table", "load_table": "table", "Splits": "splits",
    "make_splits": "splits", "load_splits": "splits",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lensforge.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lensforge.data' has no attribute {name!r}")
