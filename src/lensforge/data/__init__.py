"""Data sources, safe decoding, splits and the in-memory image table.

``open_source("builtin:digits")`` or a folder / CSV / JSONL path gives a
:class:`Source`; :func:`load_table` decodes it once into uint8 tensors sized for
the model; :func:`make_splits` assigns stratified, seeded train/val/test splits.
"""

from lensforge.data.sources import SOURCES, SampleRecord, Source, list_sources, open_source
from lensforge.data.table import ImageTable, load_table
from lensforge.data.splits import Splits, make_splits

__all__ = [
    "SOURCES",
    "ImageTable",
    "SampleRecord",
    "Source",
    "Splits",
    "list_sources",
    "load_table",
    "make_splits",
    "open_source",
]
