"""One progress bar for the long steps after training (guardrails, stress): what runs, done/total, ETA.

Training has its own bar (:mod:`lensforge.train.progress`); every other long step uses
this one so they all look alike and all show a time-remaining estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class StepProgress:
    """A transient rich bar over ``total`` steps, printed on stderr; a no-op when disabled.

    Use as a context manager; it yields ``advance(what)`` which marks one step done and
    names the next one.
    """

    def __init__(self, label: str, total: int, *, enabled: bool = True, console: Console | None = None) -> None:
        self.progress = Progress(TextColumn(f"{label} " + "{task.fields[what]:<24}"), BarColumn(bar_width=20),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console or Console(stderr=True), transient=True, disable=not enabled)
        self.task = self.progress.add_task(label, total=total, what="")

    def __enter__(self) -> Callable[[str], None]:
        self.progress.__enter__()
        return self.advance

    def advance(self, what: str = "") -> None:
        self.progress.update(self.task, advance=1, what=what)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.progress.__exit__(kind, value, traceback)
