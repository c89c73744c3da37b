"""One self-contained HTML report per run: ``write_report(run_dir) -> run_dir/report.html``.

The report is a single file (inline CSS, images as base64 PNG ``data:`` URIs, no
scripts, no external URLs) built from whatever the run folder holds: each section
reads the files it needs through :class:`RunFiles` and is left out when they are
missing. Torch is never imported here.

Adding a section (e.g. from ``lensforge/stress/``)::

    from lensforge.report import RunFiles, Section, Stat, Stats, Table, register_section

    @register_section("my-scores", order=60)
    def my_scores_section(run: RunFiles) -> Section | None:
        scores = run.json("my/scores.json")  # None when the file is missing
        if scores is None:
            return None  # section skipped
        rows = [[name, f"{acc:.1%}"] for name, acc in scores["accuracy"].items()]
        return Section("My scores", [Table(("corruption", "accuracy"), rows, numeric=(1,))])

Sections appear by ascending ``order`` (summary 10, learning-curves 20,
gradient-health 30, evaluation 40, deployment 45, robustness 48, bundle 50,
configuration 90); names are
unique (a duplicate raises ValueError) and become the HTML anchors. Sections
return data blocks (:mod:`lensforge.report.blocks`: Text, Stats, Callout,
Figure, Gallery, Table, Code, Group), never HTML: the template escapes all text.
Plots go in a :class:`Figure` as PNG bytes, e.g. from
:func:`lensforge.report.plots.to_png` on a :class:`matplotlib.figure.Figure`.
The module defining a section must be imported before ``write_report`` runs;
built-in sections live in :mod:`lensforge.report.sections`,
:mod:`lensforge.report.evaluation`, :mod:`lensforge.report.deployment` and
:mod:`lensforge.report.robustness`.
"""

from lensforge.report.blocks import (
    Block,
    Callout,
    Code,
    Figure,
    Gallery,
    Group,
    Section,
    Stat,
    Stats,
    Table,
    Text,
    Thumb,
)
from lensforge.report.registry import (
    SECTIONS,
    SectionSpec,
    build_sections,
    list_sections,
    register_section,
)
from lensforge.report.render import REPORT_NAME, render_report, write_report
from lensforge.report.runfiles import RunFiles

__all__ = [
    "REPORT_NAME",
    "SECTIONS",
    "Block",
    "Callout",
    "Code",
    "Figure",
    "Gallery",
    "Group",
    "RunFiles",
    "Section",
    "SectionSpec",
    "Stat",
    "Stats",
    "Table",
    "Text",
    "Thumb",
    "build_sections",
    "list_sections",
    "register_section",
    "render_report",
    "write_report",
]
