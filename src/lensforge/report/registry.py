"""The report's section registry: each stage adds its own section by name and order.

A section is a function ``(run: RunFiles) -> Section | None``; it returns None
when the run folder lacks what it needs, and the report simply leaves it out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from lensforge.registry import Registry
from lensforge.report.blocks import BLOCK_TYPES, Block, Callout, Group, Section
from lensforge.report.runfiles import RunFiles

log = logging.getLogger(__name__)

SectionBuilder = Callable[[RunFiles], "Section | None"]


@dataclass(frozen=True)
class SectionSpec:
    """A registered section: its name (also its HTML anchor), order and builder."""

    name: str
    order: float
    build: SectionBuilder


SECTIONS: Registry[SectionSpec] = Registry("report section", listed=False)


def register_section(name: str, order: float) -> Callable[[SectionBuilder], SectionBuilder]:
    """Register a section builder; sections appear by ascending ``order``, then name.

    Built-in orders: summary 10, learning curves 20, gradient health 30,
    evaluation 40, bundle 50, configuration 90. Duplicate names raise ValueError.
    """

    def add(build: SectionBuilder) -> SectionBuilder:
        SECTIONS.register(name)(SectionSpec(name=name, order=order, build=build))
        return build

    return add


def list_sections() -> list[SectionSpec]:
    """Registered sections in report order."""
    specs = [SECTIONS.get(name) for name in SECTIONS.list()]
    return sorted(specs, key=lambda spec: (spec.order, spec.name))


def build_sections(run: RunFiles, strict: bool = False) -> list[tuple[str, Section]]:
    """Build every registered section that has its inputs, as ``(name, section)`` pairs.

    A section that fails (a malformed file, a buggy plug-in section) becomes a
    short error notice, so the rest of the report is still written; ``strict``
    raises instead (for tests).
    """
    built = []
    for spec in list_sections():
        try:
            section = spec.build(run)
            if section is not None:
                _check_blocks(section.blocks, spec.name)
        except Exception as err:  # one odd file or plug-in must not cost the whole report
            if strict:
                raise
            log.warning("report section %r skipped: %s", spec.name, err)
            section = Section(spec.name, [_error_notice(err)])
        if section is not None:
            built.append((spec.name, section))
    return built


def _check_blocks(blocks: list[Block] | tuple[Block, ...], name: str) -> None:
    for block in blocks:
        if not isinstance(block, BLOCK_TYPES):
            raise TypeError(f"report section {name!r} returned a {type(block).__name__}, "
                            f"not one of the blocks in lensforge.report.blocks")
        if isinstance(block, Group):
            _check_blocks(list(block.blocks), name)


def _error_notice(err: Exception) -> Callout:
    return Callout(f"{type(err).__name__}: {err}", title="This section could not be built",
                   tone="bad")
