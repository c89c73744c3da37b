"""Rich progress bars for decoding and training (loss, accuracy, images/s)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """One bar over all training batches; a summary line per epoch."""

    def __init__(self, console: Console, epochs: int, steps_per_epoch: int, *, enabled: bool = True) -> None:
        self.console, self.epochs, self.steps_per_epoch, self.enabled = console, epochs, steps_per_epoch, enabled
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}  "
                                             "{task.fields[speed]:.0f} img/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled, transient=True)
        self.task = self.progress.add_task("train", total=epochs * max(1, steps_per_epoch), epoch=1,
                                           epochs=epochs, loss=0.0, acc=0.0, speed=0.0)

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def start_at(self, epoch: int) -> None:
        self.progress.update(self.task, completed=epoch * self.steps_per_epoch, epoch=epoch + 1)

    def batch(self, loss: float, acc: float, speed: float) -> None:
        self.progress.update(self.task, advance=1, loss=loss, acc=acc, speed=speed)

    def epoch_done(self, row: dict[str, Any], console: Console) -> None:
        self.progress.update(self.task, completed=row["epoch"] * self.steps_per_epoch,
                             epoch=min(row["epoch"] + 1, self.epochs))
        if self.enabled:
            console.print(f"epoch {row['epoch']:>3}/{self.epochs}  train loss {row['train_loss']:.3f} "
                          f"acc {row['train_acc']:.1%}  val loss {row['val_loss']:.3f} acc {row['val_acc']:.1%}  "
                          f"{row['images_per_s']:.0f} img/s  {row['epoch_time_s']:.1f}s")

    @staticmethod
    @contextlib.contextmanager
    def decoding(console: Console, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
        with Progress(TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True, disable=not enabled or total < 2000) as progress:
            task = progress.add_task("decode", total=total)
            yield lambda n: progress.advance(task, n)
