"""What a report section is made of: a title and a list of typed content blocks.

Sections build data, never HTML: the template renders each block kind, with
autoescaping on, so a class name such as ``<script>`` is shown, not run. Images
are PNG bytes; the template embeds them as ``data:`` URIs, so the report stays
one self-contained file.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

Tone = Literal["", "info", "ok", "warn", "bad"]


def png_data_uri(png: bytes) -> str:
    """``png`` as an inline ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass
class Text:
    """A paragraph of plain text."""

    text: str
    muted: bool = False
    kind: ClassVar[str] = "text"


@dataclass
class Stat:
    """One key number: a label, its formatted value and an optional note under it."""

    label: str
    value: str
    note: str = ""
    tone: Tone = ""


@dataclass
class Stats:
    """A row of key numbers shown as cards."""

    items: Sequence[Stat]
    kind: ClassVar[str] = "stats"


@dataclass
class Callout:
    """A highlighted message (a diagnosis), with optional suggestions as a list."""

    message: str
    title: str = ""
    suggestions: Sequence[str] = ()
    tone: Tone = "info"
    kind: ClassVar[str] = "callout"


@dataclass
class Figure:
    """A plot or picture, embedded as PNG; ``width_px`` is its displayed width."""

    png: bytes
    alt: str
    caption: str = ""
    width_px: int = 700
    kind: ClassVar[str] = "figure"

    @property
    def src(self) -> str:
        return png_data_uri(self.png)


@dataclass
class Thumb:
    """One gallery image with its caption (``png`` None: the image is missing)."""

    png: bytes | None
    caption: str
    title: str = ""

    @property
    def src(self) -> str:
        return png_data_uri(self.png) if self.png is not None else ""


@dataclass
class Gallery:
    """A grid of small captioned images."""

    items: Sequence[Thumb]
    caption: str = ""
    kind: ClassVar[str] = "gallery"


@dataclass
class Table:
    """A table of preformatted cells.

    ``numeric`` and ``mono`` are column indices shown right-aligned and in a
    monospace font; ``highlight`` are row indices to mark; ``collapsed`` folds
    the table into a ``<details>`` block titled by ``caption``.
    """

    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""
    numeric: Sequence[int] = ()
    mono: Sequence[int] = ()
    highlight: Sequence[int] = ()
    collapsed: bool = False
    kind: ClassVar[str] = "table"


@dataclass
class Code:
    """Preformatted text (a config file), folded in a ``<details>`` block by default."""

    text: str
    summary: str
    collapsed: bool = True
    kind: ClassVar[str] = "code"


@dataclass
class Group:
    """A titled sub-part of a section (e.g. one evaluation split)."""

    title: str
    blocks: Sequence[Block]
    kind: ClassVar[str] = "group"


Block = Text | Stats | Callout | Figure | Gallery | Table | Code | Group
BLOCK_TYPES: tuple[type, ...] = (Text, Stats, Callout, Figure, Gallery, Table, Code, Group)


@dataclass
class Section:
    """One part of the report: a title and its content blocks, in order."""

    title: str
    blocks: list[Block] = field(default_factory=list)
