"""``train(cfg)``: data -> model -> epochs -> run folder, with checkpoints and resume."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from lensforge.data.sources import Source, open_source
from lensforge.data.splits import Splits, load_splits, make_splits
from lensforge.data.table import ImageTable, load_table
from lensforge.errors import UsageError
from lensforge.models.registry import count_params
from lensforge.train.augment import policy_for
from lensforge.train.checkpoint import (
    Checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lensforge.train.config import TrainConfig, dump_config, load_config_file, make_config
from lensforge.train.diagnosis import diagnose_fit
from lensforge.train.distributed import DistContext
from lensforge.train.health import GradientHealthMonitor
from lensforge.train.loop import (
    Batches,
    LoopState,
    StepContext,
    evaluate_batches,
    make_adversary,
    run_epoch,
    snapshot,
)
from lensforge.train.optim import apply_transfer, build_optimizer
from lensforge.train.probe import fit_probe, probe_bf16, supports_probe
from lensforge.train.progress import TrainProgress
from lensforge.train.run import WEIGHTS_FILE, now_iso, update_run_info, versions
from lensforge.train.setup import Resolved, batch_and_lr, build_model, resolve
from lensforge.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text


@dataclass
class TrainResult:
    """What a finished run hands to the next stage."""

    run_dir: Path
    model: nn.Module
    table: ImageTable
    splits: Splits
    history: list[dict[str, Any]]
    best_val_acc: float
    resolved: Resolved
    timings_s: dict[str, float]
    # the metric ``best_val_acc`` holds: "acc" (classification), "map" (detection, COCO mAP@[.5:.95])
    primary_metric: str = "acc"


def prepare_run_dir(cfg: TrainConfig, resume: bool) -> TrainConfig:
    """The config to train with (a resumed run's own), after refusing an ``--out`` that cannot be used."""
    run_dir = Path(cfg.out)
    saved = run_dir / "config.yaml"
    if resume:
        if not saved.exists():
            raise UsageError(f"--resume: '{run_dir}' holds no run to resume (no config.yaml)")
        return make_config(load_config_file(saved), where=str(saved))
    if (run_dir / "run.json").exists() or saved.exists():
        raise UsageError(f"'{run_dir}' already holds a run: pass --resume to continue it or choose another --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out '{run_dir}' is a file, not a folder")
    return cfg  # the folder itself is made once the data has loaded: bad input leaves nothing behind


def _load_data(cfg: TrainConfig, console: Console, source: Source | None = None
               ) -> tuple[Any, ImageTable, Splits, Resolved, nn.Module]:
    source = source if source is not None else open_source(cfg.data)
    resolved = resolve(cfg, source)
    model, pre = build_model(resolved, num_classes=len(source.class_names))
    with TrainProgress.decoding(console, len(source.records)) as advance:
        table = load_table(source, pre, on_bad_image=cfg.on_bad_image, progress=advance)
    for bad in table.skipped:
        console.print(f"[yellow]skipped[/] {bad['reason']}")
    splits_path = Path(cfg.splits_file) if cfg.splits_file else Path(cfg.out) / "splits.json"
    if splits_path.exists():
        splits = load_splits(splits_path, table)
    else:
        splits = make_splits(table, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    resolved.batch_size, resolved.lr = batch_and_lr(cfg, len(splits.train))  # the split is known now
    return source, table, splits, resolved, model


def _write_run_header(cfg: TrainConfig, source: Any, table: ImageTable, splits: Splits,
                      resolved: Resolved, model: nn.Module) -> None:
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    if not (run_dir / "splits.json").exists():
        atomic_write_json(run_dir / "splits.json", splits.to_json(table))
    if table.skipped:
        atomic_write_json(run_dir / "bad_images.json", table.skipped)
    update_run_info(
        run_dir, name=run_dir.name, task=table.task, status="training", model=resolved.model_name,
        pretrained=resolved.pretrained, data=source.spec, class_names=table.class_names,
        preprocess=table.preprocess.to_dict(), params=count_params(model), created=now_iso(),
        versions=versions(), split_sizes={k: len(splits.get(k)) for k in ("train", "val", "test")},
        resolved={"image_size": resolved.image_size, "channels": resolved.channels, "lr": resolved.lr,
                  "batch_size": resolved.batch_size, "augment": resolved.augment, "hflip": resolved.hflip,
                  "transfer": resolved.transfer, "device": str(resolved.device), "amp_bf16": resolved.amp,
                  "channels_last": resolved.channels_last})


def _make_teacher(cfg: TrainConfig, table: ImageTable, device: torch.device) -> Any:
    if cfg.teacher is None:
        return None
    from lensforge.train.distill import load_teacher

    return load_teacher(cfg.teacher, class_names=table.class_names, device=device)


def _make_extras(cfg: TrainConfig, model: nn.Module, num_classes: int) -> tuple[Any, Any, nn.Module]:
    from timm.loss import SoftTargetCrossEntropy

    mixup, ema = None, None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if cfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay)
    if cfg.teacher is not None:
        from lensforge.train.distill import DistillationLoss

        criterion = DistillationLoss(criterion, temperature=cfg.distill_temperature, alpha=cfg.distill_alpha)
    return mixup, ema, criterion


def _initial_model(cfg: TrainConfig, model: nn.Module, table: ImageTable, init_model: nn.Module | None,
                   structure: list[dict[str, Any]] | None, resume: bool) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The model to start from: a given one (e.g. pruned), a resumed run's rebuilt structure, or fresh."""
    if init_model is not None:
        return init_model, list(structure or [])
    if resume:
        from lensforge.train.run import apply_structure, read_run_info

        ops = read_run_info(Path(cfg.out)).get("structure") or []
        return apply_structure(model, ops, table.preprocess), ops
    return model, []


EpochCallback = Callable[[dict[str, Any]], None]  # called with each epoch's metrics row


def train(cfg: TrainConfig, *, resume: bool = False, **kwargs: Any) -> Any:
    """Train a model for the data's task (classification, detection, ...) as ``cfg`` says.

    The task comes from the data source (:mod:`lensforge.tasks`); its torch half trains.
    Keyword arguments are those of the task's trainer (for classification see
    :func:`train_classifier`). Returns that trainer's result.
    """
    from lensforge.tasks import get_task

    resolved = prepare_run_dir(cfg, resume)
    source = open_source(resolved.data, on_bad_label=resolved.on_bad_label)
    return get_task(source.task).torch().train(cfg, resume=resume, source=source, **kwargs)


def train_classifier(cfg: TrainConfig, *, resume: bool = False, console: Console | None = None,
                     show_progress: bool = True, init_model: nn.Module | None = None,
                     structure: list[dict[str, Any]] | None = None, on_epoch_end: EpochCallback | None = None,
                     source: Source | None = None) -> TrainResult:
    """Train a classifier as ``cfg`` says, writing the run folder ``cfg.out``.

    ``init_model`` starts from a given model instead of a fresh one (e.g. a pruned model to
    fine-tune); ``structure`` records how its shape differs from the registry's (see
    :func:`lensforge.train.run.apply_structure`) so the run can be loaded back.
    ``on_epoch_end(row)`` is called with each epoch's metrics row after its checkpoint is
    written (a tuner reports intermediate values there; an exception it raises stops training).
    With ``cfg.time_limit_s``, training stops before an epoch that would not finish in time.

    In a data-parallel job (an initialised process group, see :mod:`lensforge.train.distributed`)
    every rank calls this; each trains on its shard, and only rank 0 prints, writes the run
    folder and calls ``on_epoch_end`` (the other ranks' results hold their last weights).
    """
    dist = DistContext.current()
    console = console or Console(stderr=True)
    if not dist.is_main:
        console, show_progress = Console(stderr=True, quiet=True), False
    started = time.perf_counter()
    cfg = prepare_run_dir(cfg, resume)
    dist.barrier()  # every rank has checked --out before rank 0 writes into it
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    source, table, splits, resolved, model = _load_data(cfg, console, source)
    resolved.device = dist.place(resolved.device)
    per_rank_batch = dist.per_rank_batch(resolved.batch_size)
    model, structure = _initial_model(cfg, model, table, init_model, structure, resume)
    timings = {"data": time.perf_counter() - started}
    if not resume and dist.is_main:
        _write_run_header(cfg, source, table, splits, resolved, model)
        update_run_info(Path(cfg.out), structure=structure, teacher=cfg.teacher, processes=dist.world_size)
    model.to(resolved.device)
    if resolved.channels_last:
        model.to(memory_format=torch.channels_last)
    train_batches = Batches(table, splits.train, per_rank_batch, resolved.device, resolved.channels_last,
                            rank=dist.rank, world_size=dist.world_size)
    val_batches = Batches(table, splits.val if len(splits.val) else splits.train, 256, resolved.device,
                          resolved.channels_last)
    backbone_scale = cfg.backbone_lr_scale if resolved.pretrained else 1.0
    optimizer = build_optimizer(model, cfg, resolved.lr, backbone_scale)
    mixup, ema, criterion = _make_extras(cfg, model, len(table.class_names))
    steps_per_epoch = train_batches.num_batches(train_batches.drop_last(mixup is not None))
    if cfg.max_train_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.max_train_batches)
    monitor = GradientHealthMonitor(model, every_n_steps=cfg.health_every)
    state = LoopState()
    if resume and (Path(cfg.out) / "checkpoints" / "latest.json").exists():
        state = _restore(Path(cfg.out), model, optimizer, ema, monitor)
        console.print(f"resuming [bold]{cfg.out}[/] after epoch {state.epoch}")
        _note_other_process_count(Path(cfg.out), dist.world_size, console)
    elif resolved.transfer == "probe" and resolved.pretrained:
        _start_from_probe(model, train_batches, val_batches, resolved, state, console, Path(cfg.out), dist.is_main)
    ctx = StepContext(model, optimizer, criterion, monitor, cfg, state, steps_per_epoch * cfg.epochs,
                      int(cfg.warmup_epochs * steps_per_epoch), resolved.amp, resolved.device, mixup, ema,
                      _make_teacher(cfg, table, resolved.device), train_batches.unnormalize,
                      make_adversary(cfg, train_batches), dist)
    _fit(ctx, train_batches, val_batches, resolved, console, show_progress, on_epoch_end)
    timings["train"] = time.perf_counter() - started - timings["data"]
    final = _finish(ctx, resolved, table, timings)
    return TrainResult(Path(cfg.out), final, table, splits, state.history, state.best_val_acc, resolved, timings)


def _restore(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any,
             monitor: GradientHealthMonitor) -> LoopState:
    ckpt = load_checkpoint(run_dir)
    model.load_state_dict(ckpt.model)
    optimizer.load_state_dict(ckpt.optimizer)
    if ema is not None and ckpt.ema is not None:
        ema.module.load_state_dict(ckpt.ema)
    monitor.load_state_dict(ckpt.state["monitor"])
    set_rng_state(ckpt.state["rng"])
    return LoopState(**ckpt.state["loop"])


def _start_from_probe(model: nn.Module, train_batches: Batches, val_batches: Batches, resolved: Resolved,
                      state: LoopState, console: Console, run_dir: Path, main: bool) -> None:
    """Fit the head on frozen features (:mod:`lensforge.train.probe`); the probed model is epoch 0's best."""
    if not supports_probe(model):
        console.print("[yellow]note:[/] this model has no single linear head to probe: fine-tuning top stages first")
        return
    probe = fit_probe(model, train_batches, val_batches, bf16=probe_bf16(resolved.device, resolved.amp),
                      folder=run_dir / "probe" if main else None)
    source = "computed" if probe.cache == "computed" else f"read from the {probe.cache} cache"
    console.print(f"linear probe: val acc {probe.val_acc:.1%} (features of {len(train_batches) + len(val_batches):,} "
                  f"images {source} in {probe.features_s:.1f} s, head fitted in {probe.fit_s:.1f} s)")
    # a fine-tuned epoch that ties the probe on validation replaces it (it has adapted further)
    state.best_val_acc = math.nextafter(probe.val_acc, -math.inf)
    if main:
        _save_weights(run_dir / "best.safetensors", model)
        update_run_info(run_dir, probe=probe.to_json())


def _note_other_process_count(run_dir: Path, processes: int, console: Console) -> None:
    """Resuming with another process count is valid, but the ranks' augmentation streams differ."""
    from lensforge.train.run import read_run_info

    before = read_run_info(run_dir).get("processes", 1)
    if before != processes:
        console.print(f"[yellow]note:[/] the run trained with {before} process(es) and resumes with {processes}: "
                      f"the result is valid but not bit-identical to an uninterrupted run")


def _fit(ctx: StepContext, train_batches: Batches, val_batches: Batches, resolved: Resolved,
         console: Console, show_progress: bool, on_epoch_end: EpochCallback | None = None) -> None:
    cfg, state, run_dir, main = ctx.cfg, ctx.state, Path(ctx.cfg.out), ctx.dist.is_main
    started, first_epoch = time.perf_counter(), state.epoch  # the time limit counts this session's epochs
    policy = policy_for(resolved.augment, resolved.image_size, resolved.hflip)
    good = {**snapshot(ctx.model, ctx.optimizer), "epoch": state.epoch}
    writer = _tensorboard(run_dir) if cfg.tensorboard and main else None
    with TrainProgress(console, cfg.epochs, ctx.total_steps // cfg.epochs, enabled=show_progress) as bar:
        bar.start_at(state.epoch)
        for epoch in range(state.epoch, cfg.epochs):
            apply_transfer(ctx.model, resolved.transfer if resolved.pretrained else "full", epoch, cfg.epochs)
            ctx.ddp = ctx.dist.wrap(ctx.model, ctx.ddp)
            row = run_epoch(ctx, train_batches, policy, epoch, good, on_batch=bar.batch)
            eval_model = ctx.ema.module if ctx.ema is not None else ctx.model
            # rank 0 validates the model it writes (see lensforge.train.distributed) and tells the others
            val = evaluate_batches(eval_model, val_batches, resolved.amp) if main else (0.0, 0.0)
            row["val_loss"], row["val_acc"] = ctx.dist.broadcast(val)
            row = {"epoch": epoch + 1, "step": state.step, **row,
                   "lr": ctx.optimizer.param_groups[-1]["lr"]}
            state.history.append(row)
            state.epoch = epoch + 1
            if row["val_acc"] > state.best_val_acc:
                state.best_val_acc, state.best_epoch = row["val_acc"], epoch + 1
                if main:
                    _save_weights(run_dir / "best.safetensors", eval_model)
            if main:
                _end_of_epoch(ctx, run_dir, writer)
            good = {**snapshot(ctx.model, ctx.optimizer), "epoch": state.epoch}
            bar.epoch_done(row, console)
            if on_epoch_end is not None and main:
                on_epoch_end(row)
            if cfg.early_stopping and state.epoch - state.best_epoch >= cfg.early_stopping:
                console.print(f"early stop: no val improvement for {cfg.early_stopping} epochs")
                break
            out_of_time = _out_of_time(cfg, started, state.epoch - first_epoch, state.epoch < cfg.epochs)
            if ctx.dist.broadcast([float(out_of_time)])[0]:  # rank 0's clock decides for every rank
                console.print(f"time limit {cfg.time_limit_s:.0f}s: stopping after epoch {state.epoch} "
                              f"of {cfg.epochs} (best epoch {state.best_epoch} is kept)")
                break


def _out_of_time(cfg: TrainConfig, started: float, epochs_done_here: int, more_to_go: bool) -> bool:
    """True when another epoch, at this session's mean epoch time, would end past ``cfg.time_limit_s``."""
    if cfg.time_limit_s is None or not more_to_go:
        return False
    elapsed = time.perf_counter() - started
    return elapsed + elapsed / max(1, epochs_done_here) > cfg.time_limit_s


def _end_of_epoch(ctx: StepContext, run_dir: Path, writer: Any) -> None:
    state = ctx.state
    lines = "".join(__import__("json").dumps(r) + "\n" for r in state.history)
    atomic_write_text(run_dir / "metrics.jsonl", lines)
    atomic_write_json(run_dir / "health.json", ctx.monitor.to_json())
    save_checkpoint(run_dir, Checkpoint(
        epoch=state.epoch, model=ctx.model.state_dict(), optimizer=ctx.optimizer.state_dict(),
        ema=ctx.ema.module.state_dict() if ctx.ema is not None else None,
        state={"loop": state.to_json(), "monitor": ctx.monitor.state_dict(), "rng": rng_state()}))
    if writer is not None:
        for key, value in state.history[-1].items():
            if key != "epoch" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, state.epoch)
        writer.flush()


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'lensforge[tensorboard]'") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _save_weights(path: Path, model: nn.Module) -> None:
    from safetensors.torch import save as save_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save_bytes(tensors))


def _finish(ctx: StepContext, resolved: Resolved, table: ImageTable, timings: dict[str, float]) -> nn.Module:
    """Load the best epoch's weights, write final weights, diagnosis and run.json."""
    from safetensors.torch import load_file

    run_dir, state = Path(ctx.cfg.out), ctx.state
    final = ctx.ema.module if ctx.ema is not None else ctx.model
    if not ctx.dist.is_main:  # other ranks keep their last weights: on other nodes the run folder may not be there
        return final.eval()
    final.load_state_dict(load_file(run_dir / "best.safetensors"))
    final.eval()
    _save_weights(run_dir / WEIGHTS_FILE, final)
    fit = diagnose_fit(state.history, num_classes=len(table.class_names))
    diagnosis = {"fit": [{"kind": d.kind, "message": d.message, "suggestions": list(d.suggestions)} for d in fit],
                 "health": ctx.monitor.diagnosis()}
    atomic_write_json(run_dir / "diagnosis.json", diagnosis)
    atomic_write_json(run_dir / "health.json", ctx.monitor.to_json())
    update_run_info(run_dir, status="complete", best_epoch=state.best_epoch, best_val_acc=state.best_val_acc,
                    epochs_run=state.epoch, timings_s={k: round(v, 2) for k, v in timings.items()})
    return final


__all__ = ["TrainResult", "train", "train_classifier"]
