"""Render a run folder's sections into one self-contained HTML file."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import jinja2

# Imported for their side effect: the built-in sections register themselves.
from lensforge.report import deployment, evaluation, robustness, sections  # noqa: F401
from lensforge.report.formatting import MISSING, fmt_date, fmt_text
from lensforge.report.registry import build_sections
from lensforge.report.runfiles import RunFiles
from lensforge.utils.io import atomic_write_text

REPORT_NAME = "report.html"


@dataclass
class Header:
    """What the page header and footer show about the run."""

    name: str
    model: str
    data: str
    task: str
    created: str
    versions: list[tuple[str, str]]
    generated: str


def write_report(run_dir: str | Path, *, strict: bool = False) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path.

    Sections whose inputs are missing are left out; a section whose files are
    malformed shows an error notice instead (``strict=True`` raises instead).
    Raises :class:`~lensforge.errors.ArtifactError` if ``run_dir`` is not a folder.
    """
    run = RunFiles(run_dir)
    return atomic_write_text(run.dir / REPORT_NAME, render_report(run, strict=strict))


def render_report(run: RunFiles, *, strict: bool = False) -> str:
    """The report of ``run`` as one HTML string."""
    template = _environment().get_template("report.html")
    built = [(_anchor(name), section) for name, section in build_sections(run, strict=strict)]
    return template.render(header=_header(run), sections=built)


def _anchor(name: str) -> str:
    """A section name as an HTML id: letters, digits, ``-`` and ``_`` only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "section"


def _header(run: RunFiles) -> Header:
    info = run.run or {}
    versions = info.get("versions") or {}
    if not isinstance(versions, dict):
        versions = {}
    return Header(
        name=fmt_text(info.get("name")) if info.get("name") else run.dir.name,
        model=fmt_text(info.get("model")),
        data=fmt_text(info.get("data")),
        task=fmt_text(info.get("task")),
        created=fmt_date(info.get("created")),
        versions=[(str(k), fmt_text(v)) for k, v in versions.items()],
        generated=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by lensforge "
                  f"{_lensforge_version()}",
    )


def _lensforge_version() -> str:
    try:
        return metadata.version("lensforge")
    except metadata.PackageNotFoundError:
        return MISSING


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("lensforge.report", "templates"),
        autoescape=True,  # class names, messages and configs are data, never markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )

