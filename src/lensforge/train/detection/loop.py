"""One detection epoch and one validation pass.

Shares the classification loop's machinery (:mod:`lensforge.train.loop`): :class:`StepContext`,
the gradient-health verdicts, clipping with the monitor's norm, the step-indexed schedule and
the restore-on-divergence logic. What differs is the batch (images plus a ragged list of
boxes), the loss (FCOS targets assigned per batch) and validation (postprocessed detections
scored with COCO mAP).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from lensforge.data.preprocess import letterbox_scale
from lensforge.data.table import ImageTable
from lensforge.models.normalize import Normalize
from lensforge.tasks.detection import BoxTarget, DetectionHead, Detections, postprocess
from lensforge.train.detection.assign import AnchorPoints, assign_targets, pad_targets
from lensforge.train.detection.augment import Target, augment_detection
from lensforge.train.detection.loss import detection_loss
from lensforge.train.health import HealthAction
from lensforge.train.loop import VERDICTS, StepContext, autocast, clip_to_norm, handle_unhealthy
from lensforge.train.optim import schedule_factor, set_lr

LOSS_PARTS = ("loss_cls", "loss_box", "loss_ctr")
EVAL_BATCH = 64


@dataclass
class DetectionBatches:
    """Normalised (optionally augmented) batches of a detection table's split, with their boxes."""

    table: ImageTable
    indices: np.ndarray
    batch_size: int
    device: torch.device
    channels_last: bool = False
    targets: list[Target] = field(init=False)

    def __post_init__(self) -> None:
        self.images = torch.from_numpy(self.table.images[self.indices])
        self.targets = [(torch.from_numpy(t.boxes), torch.from_numpy(t.labels))
                        for t in self.table.targets[self.indices]]
        pre = self.table.preprocess
        self.normalize = Normalize(pre.mean, pre.std).to(self.device)  # uint8 pixels -> model input

    def __len__(self) -> int:
        return len(self.indices)

    def num_batches(self, drop_last: bool = False) -> int:
        n = len(self) // self.batch_size if drop_last else -(-len(self) // self.batch_size)
        return max(1, n)

    def drop_last(self) -> bool:
        """Drop a ragged last training batch when there are plenty of others (tiny ones add noise)."""
        return len(self) > self.batch_size * 4

    def iterate(self, order: torch.Tensor | None = None, pipeline: v2.Transform | None = None,
                generator: torch.Generator | None = None, drop_last: bool = False
                ) -> Iterator[tuple[torch.Tensor, list[Target]]]:
        order = torch.arange(len(self)) if order is None else order
        for b in range(self.num_batches(drop_last)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            pixels, targets = self.images[idx], [self.targets[i] for i in idx.tolist()]
            if pipeline is not None and generator is not None:
                pixels, targets = augment_detection(pixels, targets, pipeline, generator)
            x = self.normalize(pixels.to(self.device, non_blocking=True))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, targets


def detection_step(ctx: StepContext, points: AnchorPoints, x: torch.Tensor, targets: list[Target], epoch: int
                   ) -> tuple[HealthAction, float, dict[str, float]]:
    """Forward, FCOS loss, backward, health check, clip and step; returns (action, loss, loss parts)."""
    boxes, labels, valid = pad_targets(targets, x.device)
    with autocast(ctx.device, ctx.amp):
        cls_logits, box_ltrb, centerness, _ = ctx.model(x)
    loss, parts = detection_loss(cls_logits, box_ltrb, centerness, assign_targets(points, boxes, labels, valid))
    loss.backward()
    action = ctx.monitor.after_backward(loss.detach(), step=ctx.state.step, epoch=epoch)
    action = VERDICTS[ctx.dist.max_int(VERDICTS.index(action))]
    if action is not HealthAction.OK:
        ctx.optimizer.zero_grad(set_to_none=True)
        return action, float("nan"), parts
    if ctx.cfg.clip_grad_norm > 0:
        clip_to_norm(ctx.model, ctx.monitor.total_norm, ctx.cfg.clip_grad_norm)
        ctx.monitor.note_clipped(ctx.monitor.total_norm, ctx.cfg.clip_grad_norm)
    set_lr(ctx.optimizer, schedule_factor(ctx.state.step, ctx.total_steps, ctx.warmup_steps, ctx.cfg.schedule)
           * ctx.state.lr_scale)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.state.step += 1
    return action, float(loss.detach()), parts


BatchCallback = Callable[[float, float, float], None]  # (mean loss so far, a second figure, images/s)


def detection_epoch(ctx: StepContext, points: AnchorPoints, batches: DetectionBatches, pipeline: v2.Transform | None,
                    epoch: int, good: dict[str, Any], on_batch: BatchCallback | None = None) -> dict[str, float]:
    """Train one epoch; returns the mean loss, its parts and throughput."""
    ctx.model.train()
    generator = torch.Generator().manual_seed(ctx.cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(len(batches), generator=generator)
    sums, counted, seen = dict.fromkeys(("train_loss", *LOSS_PARTS), 0.0), 0, 0
    start = time.perf_counter()
    for i, (x, targets) in enumerate(batches.iterate(order, pipeline, generator, batches.drop_last())):
        if ctx.cfg.max_train_batches and i >= ctx.cfg.max_train_batches:
            break
        action, loss, parts = detection_step(ctx, points, x, targets, epoch)
        if action is not HealthAction.OK:
            handle_unhealthy(ctx, action, good)
        else:
            for key, value in (("train_loss", loss), *parts.items()):
                sums[key] += value * len(x)
            counted += len(x)
        seen += len(x)
        if on_batch is not None:
            on_batch(sums["train_loss"] / max(1, counted), sums["loss_box"] / max(1, counted),
                     seen / (time.perf_counter() - start))
    elapsed = time.perf_counter() - start
    return {**{k: v / max(1, counted) for k, v in sums.items()}, "images_per_s": seen / max(elapsed, 1e-9),
            "epoch_time_s": elapsed}


@torch.no_grad()
def predict_batches(model: torch.nn.Module, batches: DetectionBatches, head: DetectionHead, points: AnchorPoints,
                    amp: bool, score_threshold: float) -> tuple[list[Detections], float]:
    """Detections of every image of ``batches`` (original pixels), and the mean loss over them."""
    model.eval()
    sizes = batches.table.sizes[batches.indices] if batches.table.sizes is not None else None
    input_size = batches.table.preprocess.input_size
    detections: list[Detections] = []
    loss_sum, start = 0.0, 0
    for x, targets in batches.iterate():
        with autocast(batches.device, amp):
            raw = model(x)
        cls_logits, box_ltrb, centerness = (r.float() for r in raw[:3])
        assigned = assign_targets(points, *pad_targets(targets, x.device))
        loss, _ = detection_loss(cls_logits, box_ltrb, centerness, assigned)
        loss_sum += float(loss) * len(x)
        chunk = sizes[start:start + len(x)] if sizes is not None else [(input_size[1], input_size[0])] * len(x)
        scales = [letterbox_scale(tuple(size), input_size) for size in chunk]
        detections += postprocess([r.cpu().numpy() for r in (cls_logits, box_ltrb, centerness)], head, scales=scales,
                                  sizes=[tuple(int(v) for v in size) for size in chunk],
                                  score_threshold=score_threshold)
        start += len(x)
    return detections, loss_sum / max(1, len(batches))


def original_targets(batches: DetectionBatches) -> list[BoxTarget]:
    """The split's targets in original-image pixels (the table holds them in input pixels)."""
    table, input_size = batches.table, batches.table.preprocess.input_size
    targets = table.targets[batches.indices]
    if table.sizes is None:
        return list(targets)
    return [t.scaled(1.0 / letterbox_scale(tuple(size), input_size))
            for t, size in zip(targets, table.sizes[batches.indices])]
