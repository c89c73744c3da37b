"""``train_detector(cfg)``: detection data -> FCOS detector -> epochs -> run folder.

The run folder is the one classification training writes (:mod:`lensforge.train.run`), with
``task: detection`` and a ``detection`` entry in ``run.json`` (the :class:`DetectionHead`:
levels, and the score threshold chosen on validation for the best F1 at IoU 0.5). What
carries over unchanged: ``config.yaml``, ``splits.json``, crash-safe checkpoints and exact
``--resume``, gradient health, ``metrics.jsonl``, early stopping, ``time_limit_s``,
``max_train_batches``, TensorBoard, best and final weights. The best epoch is the one with
the highest validation mAP@[.5:.95] (COCO), held in ``LoopState.best_val_acc`` and
``TrainResult.best_val_acc`` (the field holds the task's primary metric, see ``primary_metric``).

Not (yet) for detection: several processes, EMA, mixup/cutmix, distillation, adversarial
training, the linear probe; the fit diagnosis is simplified (:mod:`.diagnosis`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from lensforge.data.sources import Source, open_source
from lensforge.data.splits import Splits, load_splits, make_splits
from lensforge.data.table import ImageTable, load_table
from lensforge.errors import UsageError
from lensforge.evaluate.detection import choose_score_threshold, detection_metrics
from lensforge.models.detector import FCOSDetector
from lensforge.tasks.detection import DetectionHead
from lensforge.train.checkpoint import latest_checkpoint
from lensforge.train.config import TrainConfig
from lensforge.train.detection.assign import AnchorPoints, anchor_points
from lensforge.train.detection.augment import DetectionAugment
from lensforge.train.detection.diagnosis import diagnose_detection_fit
from lensforge.train.detection.loop import DetectionBatches, detection_epoch, original_targets, predict_batches
from lensforge.train.detection.progress import DetectionProgress
from lensforge.train.detection.setup import build_detector, detection_batch_and_lr, resolve_detection
from lensforge.train.distributed import DistContext
from lensforge.train.health import GradientHealthMonitor
from lensforge.train.loop import LoopState, StepContext, snapshot
from lensforge.train.progress import TrainProgress
from lensforge.train.run import WEIGHTS_FILE, update_run_info
from lensforge.train.setup import Resolved
from lensforge.train.trainer import (
    EpochCallback,
    TrainResult,
    _end_of_epoch,
    _out_of_time,
    _restore,
    _save_weights,
    _tensorboard,
    _write_run_header,
    prepare_run_dir,
)
from lensforge.utils.io import atomic_write_json

VAL_BATCH = 64
# Candidates per image entering NMS in the per-epoch validation (the head's own, 1,000, at the end): the
# NMS IoU matrix grows with its square, and an early model scores hundreds of points above the 0.05 floor;
# COCO keeps 100 detections per image, so 300 candidates change the mAP little and cut validation ~2x.
VAL_PRE_NMS_TOP_K = 300


def train_detector(cfg: TrainConfig, *, resume: bool = False, console: Console | None = None,
                   show_progress: bool = True, on_epoch_end: EpochCallback | None = None,
                   source: Source | None = None, init_model: nn.Module | None = None,
                   structure: list[dict[str, Any]] | None = None) -> TrainResult:
    """Train a detector as ``cfg`` says, writing the run folder ``cfg.out``.

    ``init_model`` starts from a given detector instead of a fresh one (its registry name
    is ``cfg.model``); ``structure`` is accepted for the trainer interface but must be empty
    (no pruned detectors yet). ``on_epoch_end(row)`` is called with each epoch's metrics row
    after its checkpoint is written; an exception it raises stops training.
    """
    if DistContext.current().world_size > 1:
        raise UsageError("detection trains in one process for now: drop --nproc")
    if structure:
        raise UsageError("pruned detectors cannot be trained yet (structure given)")
    console = console or Console(stderr=True)
    started = time.perf_counter()
    cfg = prepare_run_dir(cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    source, table, splits, resolved, model = _load_data(cfg, console, source)
    model = init_model if init_model is not None else model
    head = model.head_geometry(table.preprocess.input_size)
    timings = {"data": time.perf_counter() - started}
    run_dir = Path(cfg.out)
    if not resume:
        _write_run_header(cfg, source, table, splits, resolved, model)
        update_run_info(run_dir, detection=head.to_dict(), structure=[], processes=1, primary_metric="map")
    model.to(resolved.device)
    if resolved.channels_last:
        model.to(memory_format=torch.channels_last)
    train_batches = DetectionBatches(table, splits.train, resolved.batch_size, resolved.device, resolved.channels_last)
    val_batches = DetectionBatches(table, splits.val if len(splits.val) else splits.train, VAL_BATCH,
                                   resolved.device, resolved.channels_last)
    optimizer = build_detector_optimizer(model, cfg, resolved)
    steps_per_epoch = train_batches.num_batches(train_batches.drop_last())
    if cfg.max_train_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.max_train_batches)
    monitor = GradientHealthMonitor(model, every_n_steps=cfg.health_every)
    state = LoopState()
    if resume and latest_checkpoint(run_dir) is not None:
        state = _restore(run_dir, model, optimizer, None, monitor)
        console.print(f"resuming [bold]{cfg.out}[/] after epoch {state.epoch}")
    ctx = StepContext(model, optimizer, nn.Identity(), monitor, cfg, state, steps_per_epoch * cfg.epochs,
                      int(cfg.warmup_epochs * steps_per_epoch), resolved.amp, resolved.device)
    if state.planned_steps:  # a resumed run whose schedule its time limit shortened
        ctx.total_steps = state.planned_steps
    points = anchor_points(head, resolved.device)
    _fit(ctx, points, head, train_batches, val_batches, resolved, console, show_progress, on_epoch_end)
    timings["train"] = time.perf_counter() - started - timings["data"]
    final = _finish(ctx, points, head, val_batches, timings)
    return TrainResult(run_dir, final, table, splits, state.history, state.best_val_acc, resolved, timings,
                       primary_metric="map")


def _load_data(cfg: TrainConfig, console: Console, source: Source | None
               ) -> tuple[Source, ImageTable, Splits, Resolved, FCOSDetector]:
    source = source if source is not None else open_source(cfg.data)
    resolved = resolve_detection(cfg, source)
    model, pre = build_detector(resolved, num_classes=len(source.class_names))
    with TrainProgress.decoding(console, len(source.records)) as advance:
        table = load_table(source, pre, on_bad_image=cfg.on_bad_image, progress=advance)
    for bad in table.skipped:
        console.print(f"[yellow]skipped[/] {bad['reason']}")
    splits_path = Path(cfg.splits_file) if cfg.splits_file else Path(cfg.out) / "splits.json"
    if splits_path.exists():
        splits = load_splits(splits_path, table)
    else:
        splits = make_splits(table, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    resolved.batch_size, resolved.lr = detection_batch_and_lr(cfg, len(splits.train))
    return source, table, splits, resolved, model


def build_detector_optimizer(model: FCOSDetector, cfg: TrainConfig, resolved: Resolved) -> torch.optim.Optimizer:
    """{backbone, neck and head} x {decay, no decay}; a pretrained backbone at ``cfg.backbone_lr_scale``."""
    backbone = model.backbone_parameter_names()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        groups.setdefault((name not in backbone, param.ndim <= 1 or name.endswith(".bias")), []).append(param)
    backbone_scale = cfg.backbone_lr_scale if resolved.pretrained else 1.0
    param_groups = []
    for (is_head, no_decay), params in sorted(groups.items()):
        lr = resolved.lr * (1.0 if is_head else backbone_scale)
        param_groups.append({"params": params, "lr": lr, "base_lr": lr,
                             "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=resolved.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(param_groups, lr=resolved.lr)


def validate(model: nn.Module, batches: DetectionBatches, head: DetectionHead, points: AnchorPoints,
             amp: bool) -> dict[str, Any]:
    """Validation loss and COCO mAP of ``model`` on ``batches`` (detections above ``head.eval_score_floor``)."""
    head = replace(head, pre_nms_top_k=min(head.pre_nms_top_k, VAL_PRE_NMS_TOP_K))
    detections, loss = predict_batches(model, batches, head, points, amp, head.eval_score_floor)
    metrics = detection_metrics(detections, original_targets(batches), batches.table.class_names)
    return {"val_loss": loss, "val_map": metrics["map"] or 0.0, "val_map50": metrics["map50"] or 0.0,
            "val_map75": metrics["map75"] or 0.0}


ROW_ORDER = ("epoch", "step", "train_loss", "loss_cls", "loss_box", "loss_ctr", "val_loss", "val_map", "val_map50",
             "val_map75", "lr", "images_per_s", "epoch_time_s")


def _fit(ctx: StepContext, points: AnchorPoints, head: DetectionHead, train_batches: DetectionBatches,
         val_batches: DetectionBatches, resolved: Resolved, console: Console, show_progress: bool,
         on_epoch_end: EpochCallback | None) -> None:
    cfg, state, run_dir = ctx.cfg, ctx.state, Path(ctx.cfg.out)
    started, first_epoch = time.perf_counter(), state.epoch  # the time limit counts this session's epochs
    pipeline = DetectionAugment(resolved.augment, train_batches.table.preprocess.input_size,
                                train_batches.table.preprocess.channels, resolved.hflip).pipeline()
    good = {**snapshot(ctx.model, ctx.optimizer), "epoch": state.epoch}
    writer = _tensorboard(run_dir) if cfg.tensorboard else None
    with DetectionProgress(console, cfg.epochs, ctx.total_steps // cfg.epochs, enabled=show_progress) as bar:
        bar.start_at(state.epoch)
        for epoch in range(state.epoch, cfg.epochs):
            row = detection_epoch(ctx, points, train_batches, pipeline, epoch, good, on_batch=bar.batch)
            row = {"epoch": epoch + 1, "step": state.step, **row,
                   **validate(ctx.model, val_batches, head, points, resolved.amp),
                   "lr": ctx.optimizer.param_groups[-1]["lr"]}
            row = {key: row[key] for key in ROW_ORDER if key in row}
            state.history.append(row)
            state.epoch = epoch + 1
            if row["val_map"] > state.best_val_acc:  # best_val_acc holds the primary metric, here mAP
                state.best_val_acc, state.best_epoch = row["val_map"], epoch + 1
                _save_weights(run_dir / "best.safetensors", ctx.model)
            _end_of_epoch(ctx, run_dir, writer)
            good = {**snapshot(ctx.model, ctx.optimizer), "epoch": state.epoch}
            bar.epoch_done(row, console)
            if on_epoch_end is not None:
                on_epoch_end(row)
            if cfg.early_stopping and state.epoch - state.best_epoch >= cfg.early_stopping:
                console.print(f"early stop: no val mAP improvement for {cfg.early_stopping} epochs")
                break
            if state.epoch == 1 and first_epoch == 0:
                _fit_schedule_to_time(ctx, time.perf_counter() - started, console)
            if _out_of_time(cfg, started, state.epoch - first_epoch, state.epoch < cfg.epochs):
                console.print(f"time limit {cfg.time_limit_s:.0f}s: stopping after epoch {state.epoch} "
                              f"of {cfg.epochs} (best epoch {state.best_epoch} is kept)")
                break


def _fit_schedule_to_time(ctx: StepContext, first_epoch_s: float, console: Console) -> None:
    """After the first epoch, shorten the learning-rate schedule to the epochs the time limit allows.

    Without this a time limit stops a one-cycle schedule planned for ``--epochs`` before it
    anneals, and the best weights are those of a high learning rate. The shortened length is
    kept in the loop state, so ``--resume`` continues the same schedule.
    """
    cfg = ctx.cfg
    if cfg.time_limit_s is None:
        return
    fits = max(1, int(cfg.time_limit_s // max(first_epoch_s, 1e-9)))
    if fits >= cfg.epochs:
        return
    ctx.total_steps = ctx.total_steps // cfg.epochs * fits
    ctx.state.planned_steps = ctx.total_steps
    console.print(f"time limit {cfg.time_limit_s:.0f}s: {fits} of {cfg.epochs} epochs fit at {first_epoch_s:.1f} s "
                  f"each; the learning-rate schedule now ends at epoch {fits}")


def _finish(ctx: StepContext, points: AnchorPoints, head: DetectionHead, val_batches: DetectionBatches,
            timings: dict[str, float]) -> nn.Module:
    """Best weights back in, final weights, score threshold chosen on validation, diagnosis, run.json."""
    from safetensors.torch import load_file

    run_dir, state, model = Path(ctx.cfg.out), ctx.state, ctx.model
    model.load_state_dict(load_file(run_dir / "best.safetensors"))
    model.eval()
    _save_weights(run_dir / WEIGHTS_FILE, model)
    detections, _ = predict_batches(model, val_batches, head, points, ctx.amp, head.eval_score_floor)
    threshold, precision, recall, f1 = choose_score_threshold(detections, original_targets(val_batches),
                                                              fallback=head.score_threshold)
    chosen = replace(head, score_threshold=round(threshold, 4))
    fit = diagnose_detection_fit(state.history)
    atomic_write_json(run_dir / "diagnosis.json", {
        "fit": [{"kind": d.kind, "message": d.message, "suggestions": list(d.suggestions)} for d in fit],
        "health": ctx.monitor.diagnosis(), "fit_rules": "simplified for detection (train/detection/diagnosis.py)"})
    atomic_write_json(run_dir / "health.json", ctx.monitor.to_json())
    best = state.history[state.best_epoch - 1] if state.best_epoch else {}
    update_run_info(run_dir, status="complete", detection=chosen.to_dict(), best_epoch=state.best_epoch,
                    best_val_map=state.best_val_acc, best_val_map50=best.get("val_map50"), epochs_run=state.epoch,
                    score_threshold_fit={"split": "val", "iou": 0.5, "precision": round(precision, 4),
                                         "recall": round(recall, 4), "f1": round(f1, 4)},
                    timings_s={k: round(v, 2) for k, v in timings.items()})
    return model


__all__ = ["build_detector_optimizer", "train_detector", "validate"]
