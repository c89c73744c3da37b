"""Progress bar of a detection run: the classification bar with loss, box loss and mAP."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lensforge.train.progress import TrainProgress


class DetectionProgress(TrainProgress):
    """One bar over all training batches (loss, GIoU loss, images/s); a line with val mAP per epoch."""

    def __init__(self, console: Console, epochs: int, steps_per_epoch: int, *, enabled: bool = True) -> None:
        self.console, self.epochs, self.steps_per_epoch, self.enabled = console, epochs, steps_per_epoch, enabled
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}  box {task.fields[acc]:.3f}  "
                                             "{task.fields[speed]:.0f} img/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled, transient=True)
        self.task = self.progress.add_task("train", total=epochs * max(1, steps_per_epoch), epoch=1,
                                           epochs=epochs, loss=0.0, acc=0.0, speed=0.0)

    def epoch_done(self, row: dict[str, Any], console: Console) -> None:
        self.progress.update(self.task, completed=row["epoch"] * self.steps_per_epoch,
                             epoch=min(row["epoch"] + 1, self.epochs))
        if self.enabled:
            console.print(f"epoch {row['epoch']:>3}/{self.epochs}  train loss {row['train_loss']:.3f} "
                          f"(cls {row['loss_cls']:.3f} box {row['loss_box']:.3f} ctr {row['loss_ctr']:.3f})  "
                          f"val loss {row['val_loss']:.3f} mAP {row['val_map']:.3f} mAP50 {row['val_map50']:.3f}  "
                          f"{row['images_per_s']:.0f} img/s  {row['epoch_time_s']:.1f}s")
