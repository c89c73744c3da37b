"""``adapt(run, target, method=...)``: test-time and domain adaptation of a trained run.

A model trained on one domain (the run's data) is adapted to a target domain (other
lighting, camera, noise) with one of the registered methods:

- ``bn``: re-estimate every BatchNorm layer's running mean/variance on unlabelled target
  images (Schneider et al. 2020, "Improving robustness against common corruptions by
  covariate shift adaptation"); no weight changes. Cheap and safe: the first thing to try.
- ``tent``: entropy minimisation over the BatchNorm affine parameters only, BatchNorm using
  batch statistics (Wang et al., ICLR 2021); unlabelled.
- ``pseudo-label``: self-training on the model's own confident, class-capped predictions,
  after ``bn``; unlabelled.
- ``finetune``: supervised fine-tuning on ``labels`` labelled target images.

The target is split once, stratified and seeded: an *adapt* part (images whose labels the
unsupervised methods never read; ``finetune`` reads the labels of ``labels`` of them) and a
disjoint *held-out* part with labels, on which target accuracy is measured before and after.
Forgetting is measured on the run's own test split. Every method ends with a BatchNorm
statistics pass on the adapt images, so the eval-mode model (and hence the exported
bundle, which always runs in eval mode) uses statistics of the target domain computed with
its final weights.

The adapted model becomes a new run folder (``<run>-adapted-<method>``): the source run's
describing files, new ``model.safetensors``, ``run.json`` with ``adapted_from``, its own
``bundle/`` and ``stress/adapt.json`` with the figures. It is built in a hidden staging
folder and moved into place when complete; the source run is never written to.

Note for ``builtin:shapes`` targets: a domain shift with the *same* ``seed`` re-renders the
source's own scenes, so give the target another seed (``...&domain=shifted&seed=1``).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lensforge.data.splits import _stratified, load_splits
from lensforge.data.table import ImageTable
from lensforge.errors import DataError, UsageError
from lensforge.registry import Registry
from lensforge.train.augment import AugmentPolicy, policy_for
from lensforge.train.loop import Batches
from lensforge.train.run import LoadedRun

Progress = Callable[[str], None]

DESCRIBING_FILES = ("config.yaml", "splits.json", "metrics.jsonl", "health.json", "diagnosis.json",
                    "bad_images.json")  # copied into the adapted run; checkpoints, eval and bundle are not
REPORT_FILE = "stress/adapt.json"
SPLIT_FILE = "stress/adapt_split.json"  # which target images were adapted on, labelled, held out
STATS_BATCH = 256  # images per forward pass when re-estimating BatchNorm statistics


# --------------------------------------------------------------------------- settings and registry


@dataclass(frozen=True)
class AdaptSettings:
    """The resolved knobs of one adaptation (method defaults filled in).

    Attributes:
        method: registered method name.
        epochs: passes over the method's training images (adapt part, or labelled subset).
        lr: learning rate of the method's optimiser (Adam for tent, AdamW otherwise).
        batch_size: images per step; tent's entropy needs batches of reasonable size.
        labels: labelled target images (finetune only).
        threshold: minimum softmax confidence of a pseudo-label.
        eval_fraction: share of the target held out for evaluation.
        seed: seeds the target split, the labelled subset, batch order and augmentation.
    """

    method: str
    epochs: int
    lr: float
    batch_size: int
    labels: int = 0
    threshold: float = 0.9
    eval_fraction: float = 0.5
    seed: int = 0


@dataclass
class TargetData:
    """The target, decoded and split; ``table.targets`` are in the model's class order."""

    spec: str  # the target source's canonical spec
    table: ImageTable
    adapt: np.ndarray  # indices of the adaptation part (labels unused by unsupervised methods)
    labelled: np.ndarray  # indices into the adapt part whose labels finetune may read
    held_out: np.ndarray  # indices of the evaluation part, disjoint from adapt
    how: str  # "given" (the target's own test split) or "stratified"
    device: torch.device
    hflip: bool = False  # whether the run trained with horizontal flips (for the augmentation policy)


MethodFn = Callable[[nn.Module, TargetData, AdaptSettings, Progress], dict[str, Any]]


@dataclass(frozen=True)
class AdaptMethod:
    """A registered method: its update function, its needs and its default budget."""

    update: MethodFn
    epochs: int
    lr: float
    batch_size: int
    needs_batchnorm: bool = False
    needs_labels: bool = False
    summary: str = ""


ADAPT_METHODS: Registry[AdaptMethod] = Registry("adaptation-method")  # `lensforge list adaptation-methods`


def register_adapt_method(name: str, *, epochs: int, lr: float, batch_size: int, needs_batchnorm: bool = False,
                          needs_labels: bool = False) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn(model, target, settings, progress) -> stats`` as adaptation method ``name``."""

    def add(fn: MethodFn) -> MethodFn:
        summary = (fn.__doc__ or "").strip().partition("\n")[0]  # for `lensforge list`
        ADAPT_METHODS.register(name)(AdaptMethod(fn, epochs, lr, batch_size, needs_batchnorm, needs_labels,
                                                 summary))
        return fn

    return add


def list_adapt_methods(pattern: str = "*") -> list[str]:
    return ADAPT_METHODS.list(pattern)


# --------------------------------------------------------------------------- BatchNorm helpers


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def batchnorm_train_mode(model: nn.Module) -> Iterator[None]:
    """Everything in eval mode except BatchNorm, which uses (and tracks) batch statistics."""
    model.eval()
    for layer in batchnorm_layers(model):
        layer.train()
    try:
        yield
    finally:
        model.eval()


@torch.no_grad()
def recompute_batchnorm_stats(model: nn.Module, table: ImageTable, indices: np.ndarray, device: torch.device,
                              batch_size: int = STATS_BATCH) -> None:
    """Reset BatchNorm running statistics and re-estimate them as a cumulative average over ``indices``.

    ``momentum=None`` makes PyTorch keep an equal-weight average over all batches seen, so the
    result does not depend on batch order (an exponential average would favour the last batches).
    """
    layers = batchnorm_layers(model)
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    try:
        with batchnorm_train_mode(model):
            for x, _ in Batches(table, indices, batch_size, device).iterate():
                model(x)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax predictions."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


# --------------------------------------------------------------------------- training loop


def _train_epochs(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches,
                  loss_fn: Callable[..., torch.Tensor], settings: AdaptSettings, progress: Progress,
                  policy: AugmentPolicy | None, epoch_offset: int = 0, epochs: int | None = None) -> list[float]:
    """Plain epochs of ``loss_fn(logits, y)``; BatchNorm in train mode, the rest in eval mode.

    Dropout and drop-path stay off: over a budget of a few epochs their noise costs more than
    it regularises, and the steps stay reproducible from ``settings.seed``.
    """
    losses = []
    for epoch in range(epoch_offset, epoch_offset + (epochs or settings.epochs)):
        generator = torch.Generator().manual_seed(settings.seed * 1000 + epoch)  # per-epoch, like training
        order = torch.randperm(len(batches), generator=generator)
        total, count = 0.0, 0
        with batchnorm_train_mode(model):
            for x, y in batches.iterate(order, policy, generator, drop_last=len(batches) > 2 * batches.batch_size):
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(x), count + len(x)
        losses.append(round(total / max(1, count), 5))
        progress(f"{settings.method} epoch {epoch + 1}: loss {losses[-1]:.4f}")
    return losses


def _batches(data: TargetData, indices: np.ndarray, batch_size: int, targets: np.ndarray | None = None) -> Batches:
    table = data.table if targets is None else replace(data.table, targets=targets)
    return Batches(table, indices, min(batch_size, len(indices)), data.device)


def _light_augmentation(data: TargetData) -> AugmentPolicy:
    """The training recipe's default augmentation: supervised steps on few images need it too."""
    return policy_for("light", data.table.preprocess.input_size[0], data.hflip)


# --------------------------------------------------------------------------- methods


@register_adapt_method("bn", epochs=1, lr=0.0, batch_size=STATS_BATCH, needs_batchnorm=True)
def adapt_batchnorm(model: nn.Module, data: TargetData, settings: AdaptSettings, progress: Progress) -> dict[str, Any]:
    """Re-estimate BatchNorm statistics on the unlabelled adapt images; no weight changes."""
    recompute_batchnorm_stats(model, data.table, data.adapt, data.device, settings.batch_size)
    progress(f"bn: statistics of {len(batchnorm_layers(model))} BatchNorm layers re-estimated "
             f"on {len(data.adapt)} target images")
    return {"batchnorm_layers": len(batchnorm_layers(model)), "images": len(data.adapt)}


@register_adapt_method("tent", epochs=5, lr=1e-3, batch_size=128, needs_batchnorm=True)
def adapt_tent(model: nn.Module, data: TargetData, settings: AdaptSettings, progress: Progress) -> dict[str, Any]:
    """Tent: minimise prediction entropy over BatchNorm scale/shift only, with batch statistics.

    As in the paper (its CIFAR settings): Adam, lr 1e-3, batches of 128, no weight decay, every
    other parameter frozen, BatchNorm normalising with the statistics of the current batch.
    The paper's model stays in that mode; ours is exported in eval mode, so a final statistics
    pass over the adapt images stores target statistics computed under the adapted scale/shift.
    """
    layers = batchnorm_layers(model)
    affine = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    if not affine:
        raise UsageError("tent needs BatchNorm layers with affine scale/shift; this model has none: use bn")
    model.requires_grad_(False)
    for p in affine:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(affine, lr=settings.lr, betas=(0.9, 0.999), weight_decay=0.0)
    try:
        losses = _train_epochs(model, optimizer, _batches(data, data.adapt, settings.batch_size),
                               lambda logits, _y: _entropy(logits), settings, progress, policy=None)
    finally:
        model.requires_grad_(True)
    recompute_batchnorm_stats(model, data.table, data.adapt, data.device)
    return {"entropy_per_epoch": losses, "affine_params": sum(p.numel() for p in affine)}


# lr 1e-4 for the two methods that move every weight: the source run ended its one-cycle schedule
# near zero, and 3e-4 for 3 epochs undid bn's gain on a lighting shift (93% -> 84%, measured).
@register_adapt_method("pseudo-label", epochs=3, lr=1e-4, batch_size=64)
def adapt_pseudo_label(model: nn.Module, data: TargetData, settings: AdaptSettings,
                       progress: Progress) -> dict[str, Any]:
    """Self-training: bn first, then cross-entropy on confident, class-capped pseudo-labels.

    Pseudo-labels are re-selected before every epoch with the current model (eval mode):
    softmax confidence >= ``threshold``, and at most ``len(adapt) / classes`` images per
    predicted class (the most confident), so a class the shift makes the model over-predict
    cannot take over the training set and reinforce itself. BatchNorm layers (if any) are
    re-estimated first, so the initial pseudo-labels come from a target-calibrated model.
    """
    has_bn = bool(batchnorm_layers(model))
    if has_bn:
        recompute_batchnorm_stats(model, data.table, data.adapt, data.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    selected, losses = [], []
    for epoch in range(settings.epochs):
        chosen, labels = select_pseudo_labels(_logits(model, data, data.adapt), data.adapt, settings.threshold)
        selected.append(len(chosen))
        if len(chosen) == 0:
            progress(f"pseudo-label epoch {epoch + 1}: no prediction reaches confidence {settings.threshold}; stopping")
            break
        targets = data.table.targets.copy()
        targets[chosen] = labels
        losses += _train_epochs(model, optimizer, _batches(data, chosen, settings.batch_size, targets),
                                F.cross_entropy, settings, progress, _light_augmentation(data), epoch_offset=epoch,
                                epochs=1)
    if has_bn:
        recompute_batchnorm_stats(model, data.table, data.adapt, data.device)
    return {"selected_per_epoch": selected, "loss_per_epoch": losses, "threshold": settings.threshold}


def select_pseudo_labels(logits: np.ndarray, indices: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices and predicted classes of confident predictions, capped per class (most confident kept)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    cap = math.ceil(len(indices) / logits.shape[1])  # a class's share if the target were balanced
    keep: list[int] = []
    for cls in np.unique(predicted):
        members = np.flatnonzero((predicted == cls) & (confidence >= threshold))
        keep += members[np.argsort(-confidence[members], kind="stable")][:cap].tolist()
    keep_arr = np.sort(np.array(keep, dtype=np.int64))
    return indices[keep_arr], predicted[keep_arr]


@register_adapt_method("finetune", epochs=30, lr=1e-4, batch_size=32, needs_labels=True)
def adapt_finetune(model: nn.Module, data: TargetData, settings: AdaptSettings, progress: Progress) -> dict[str, Any]:
    """Supervised fine-tuning of every weight on the labelled target images.

    AdamW, no weight decay, light augmentation (as in training), then a BatchNorm statistics
    pass over the whole adapt part: its unlabelled images cost nothing and give better
    statistics than the few labelled ones.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    losses = _train_epochs(model, optimizer, _batches(data, data.labelled, settings.batch_size),
                           F.cross_entropy, settings, progress, _light_augmentation(data))
    if batchnorm_layers(model):
        recompute_batchnorm_stats(model, data.table, data.adapt, data.device)
    return {"loss_per_epoch": losses, "labelled": len(data.labelled)}


@torch.no_grad()
def _logits(model: nn.Module, data: TargetData, indices: np.ndarray) -> np.ndarray:
    model.eval()
    return torch.cat([model(x).float().cpu() for x, _ in _batches(data, indices, STATS_BATCH).iterate()]).numpy()


# --------------------------------------------------------------------------- result


@dataclass
class AdaptResult:
    """The adapted run folder, its bundle, and the before/after figures (``stress/adapt.json``)."""

    run_dir: Path
    bundle: Path
    report: dict[str, Any]
    report_path: Path
    timings_s: dict[str, float] = field(default_factory=dict)  # data, adapt, total

    def summary_lines(self) -> list[str]:
        r = self.report
        target, source = r["target_accuracy"], r["source_accuracy"]
        return [f"{r['method']}: target accuracy {target['before']:.1%} -> {target['after']:.1%} "
                f"(bundle {target['after_bundle']:.1%}; error {-r['target_error_reduction']:+.0%} relative) "
                f"on {r['split']['held_out']} held-out target images",
                f"source test accuracy {source['before']:.1%} -> {source['after']:.1%} (forgetting)",
                f"adapted run: {self.run_dir}", f"bundle: {self.bundle}"]


__all__ = ["ADAPT_METHODS", "AdaptMethod", "AdaptResult", "AdaptSettings", "TargetData", "adapt",
           "batchnorm_layers", "list_adapt_methods", "recompute_batchnorm_stats", "register_adapt_method",
           "resolve_settings", "select_pseudo_labels"]


# --------------------------------------------------------------------------- the stage


def resolve_settings(method: str, *, labels: int = 0, epochs: int | None = None, lr: float | None = None,
                     batch_size: int | None = None, threshold: float = 0.9, eval_fraction: float = 0.5,
                     seed: int = 0) -> AdaptSettings:
    """Method defaults <- explicit values, validated (UsageError naming the option)."""
    spec = ADAPT_METHODS.get(method)  # unknown -> UsageError with close matches
    if spec.needs_labels and labels <= 0:
        raise UsageError(f"--method {method} needs labelled target images: pass --labels N (N > 0)")
    if not spec.needs_labels and labels:
        raise UsageError(f"--labels is only used by finetune; {method} adapts without labels")
    checks = {"--epochs": (epochs, lambda v: v >= 1), "--lr": (lr, lambda v: 0 < v <= 10),
              "--batch-size": (batch_size, lambda v: v >= 2)}
    for option, (value, ok) in checks.items():
        if value is not None and not ok(value):
            raise UsageError(f"{option} {value} is out of range")
    if not 0 < threshold < 1:
        raise UsageError(f"--threshold must be in (0, 1), not {threshold}")
    if not 0 < eval_fraction < 1:
        raise UsageError(f"--eval-fraction must be in (0, 1), not {eval_fraction}")
    return AdaptSettings(method, epochs or spec.epochs, lr or spec.lr, batch_size or spec.batch_size,
                         labels, threshold, eval_fraction, seed)


def adapt(run_dir: str | Path, target: str, *, method: str, labels: int = 0, out: str | Path | None = None,
          epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
          threshold: float = 0.9, eval_fraction: float = 0.5, seed: int = 0, device: str = "auto",
          progress: Progress | None = None) -> AdaptResult:
    """Adapt the model of ``run_dir`` to the data ``target`` and write it as a new run with a bundle.

    Args:
        run_dir: a finished run folder (never modified).
        target: a data source spec of the target domain (the run's classes, or some of them).
        method: a registered method (``bn``, ``tent``, ``pseudo-label``, ``finetune``).
        labels: labelled target images for ``finetune`` (stratified, seeded, from the adapt part).
        out: the new run folder; default ``<run>-adapted-<method>`` beside the run (``-2``... if taken).
        epochs, lr, batch_size: override the method's defaults (see ``ADAPT_METHODS``).
        threshold: pseudo-label confidence threshold.
        eval_fraction: share of the target held out for evaluation (unless it has its own test split).
        device: "auto", "cpu" or "cuda" for the adaptation steps (evaluation runs on the CPU).
        progress: called with one line of text per step, for a CLI to print.

    Raises:
        UsageError: unknown method, bad options, a model without BatchNorm for bn/tent, ``out`` taken.
        DataError: target classes the run does not know, or a target too small to split.
    """
    from lensforge.train.run import load_run
    from lensforge.train.setup import pick_device

    started = time.perf_counter()
    say = progress or (lambda _line: None)
    settings = resolve_settings(method, labels=labels, epochs=epochs, lr=lr, batch_size=batch_size,
                                threshold=threshold, eval_fraction=eval_fraction, seed=seed)
    spec = ADAPT_METHODS.get(method)
    run = load_run(run_dir)
    if spec.needs_batchnorm and not batchnorm_layers(run.model):
        raise UsageError(f"model '{run.info['model']}' of run '{run.path}' has no BatchNorm layers; "
                         "use pseudo-label or finetune")
    out_dir = _output_dir(run.path, out, method)
    data = load_target(run, target, settings, pick_device(device))
    source_images, source_targets = _source_test(run)
    timings = {"data": time.perf_counter() - started}

    held_images, held_targets = data.table.images[data.held_out], data.table.targets[data.held_out]
    before = {"target": _accuracy(run.model, held_images, held_targets, run),
              "source": _accuracy(run.model, source_images, source_targets, run)}
    model, stats = _adapted_model(run, data, settings, spec, say)
    timings["adapt"] = time.perf_counter() - started - timings["data"]
    after = {"target": _accuracy(model, held_images, held_targets, run),
             "source": _accuracy(model, source_images, source_targets, run)}
    report = _report(run, data, settings, before, after, len(source_targets), stats, out_dir)
    bundle = _write_adapted_run(run, model, out_dir, report, data, say)
    timings["total"] = time.perf_counter() - started
    return AdaptResult(out_dir, bundle, report, out_dir / REPORT_FILE,
                       {k: round(v, 2) for k, v in timings.items()})


def _output_dir(run_dir: Path, out: str | Path | None, method: str) -> Path:
    from lensforge.utils.io import fresh_dir

    if out is None:
        return fresh_dir(run_dir.parent, f"{run_dir.name}-adapted-{method}")
    out_dir = Path(out)
    resolved, source = out_dir.resolve(), run_dir.resolve()
    if resolved == source or source in resolved.parents:
        raise UsageError(f"--out '{out_dir}' is inside the run being adapted; the source run is never written to")
    if out_dir.exists():
        raise UsageError(f"--out '{out_dir}' already exists; choose another folder")
    return out_dir


def load_target(run: LoadedRun, target: str, settings: AdaptSettings, device: torch.device) -> TargetData:
    """Decode the target at the run's input size, align its classes and split it (seeded)."""
    from lensforge.data.sources import open_source
    from lensforge.data.table import load_table
    from lensforge.evaluate.runner import _align_classes

    source = open_source(target)
    if source.spec == run.info.get("data"):
        raise UsageError(f"--target '{target}' is the run's own training data; give data of the new domain")
    table = load_table(source, run.preprocess, on_bad_image="skip")
    table = replace(table, targets=_align_classes(table, run.class_names))
    if len(table) < 4:
        raise DataError(f"target '{target}' has {len(table)} images; adaptation needs at least 4")
    fixed_test = np.array([s == "test" for s in table.fixed_splits])
    if fixed_test.any() and not fixed_test.all():
        adapt_idx, held, how = np.flatnonzero(~fixed_test), np.flatnonzero(fixed_test), "given"
    else:
        adapt_idx, held = _stratified(np.arange(len(table)), table.targets, settings.eval_fraction, settings.seed)
        how = "stratified"
    labelled = _labelled_subset(table, adapt_idx, held, settings)
    hflip = bool((run.info.get("resolved") or {}).get("hflip", False))
    return TargetData(source.spec, table, adapt_idx, labelled, held, how, device, hflip)


def _labelled_subset(table: ImageTable, adapt_idx: np.ndarray, held: np.ndarray,
                     settings: AdaptSettings) -> np.ndarray:
    """``labels`` adapt images, stratified when every class can have one; never a held-out image."""
    if settings.labels == 0:
        return adapt_idx[:0]
    if settings.labels >= len(adapt_idx):
        raise UsageError(f"--labels {settings.labels} must be below the {len(adapt_idx)} images of the target's "
                         f"adapt part ({len(table)} target images, {len(held)} held out for evaluation)")
    from sklearn.model_selection import train_test_split

    labels = table.targets[adapt_idx]
    counts = np.bincount(labels)
    classes = len(np.unique(labels))
    can_stratify = counts[counts > 0].min() >= 2 and min(settings.labels, len(adapt_idx) - settings.labels) >= classes
    stratify = labels if can_stratify else None
    chosen, _ = train_test_split(adapt_idx, train_size=settings.labels, random_state=settings.seed,
                                 stratify=stratify)
    return np.sort(chosen)


def _source_test(run: LoadedRun) -> tuple[np.ndarray, np.ndarray]:
    """The run's own test split (as recorded in ``splits.json``), for the forgetting figure."""
    from lensforge.data.sources import open_source
    from lensforge.data.table import load_table
    from lensforge.evaluate.runner import _align_classes

    table = load_table(open_source(run.info["data"]), run.preprocess, on_bad_image="skip")
    test = load_splits(run.path / "splits.json", table).test
    if len(test) == 0:
        test = np.arange(len(table))  # a run trained without a test split: all of its data
    return table.images[test], _align_classes(table, run.class_names)[test]


def _accuracy(model: nn.Module, images: np.ndarray, targets: np.ndarray, run: LoadedRun) -> float:
    from lensforge.evaluate.runner import _torch_predictor, predict_table

    logits = predict_table(_torch_predictor(model, run.preprocess, STATS_BATCH), images)
    return float((logits.argmax(axis=1) == targets).mean())


def _adapted_model(run: LoadedRun, data: TargetData, settings: AdaptSettings, spec: AdaptMethod,
                   say: Progress) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of the run's model, adapted on ``data.device``, back on the CPU in eval mode; and its stats."""
    import copy

    model = copy.deepcopy(run.model).to(data.device)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's global RNG
        torch.manual_seed(settings.seed)
        stats = spec.update(model, data, settings, say)
    return model.cpu().eval(), stats


def _report(run: LoadedRun, data: TargetData, settings: AdaptSettings, before: dict[str, float],
            after: dict[str, float], source_test: int, stats: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    error_before, error_after = 1 - before["target"], 1 - after["target"]
    return {
        "method": settings.method, "source_run": str(run.path), "adapted_run": str(out_dir),
        "model": run.info.get("model"), "source_data": run.info.get("data"), "target": data.spec,
        "settings": {k: v for k, v in settings.__dict__.items() if k != "method"},
        "split": {"how": data.how, "adapt": len(data.adapt), "held_out": len(data.held_out),
                  "labelled": len(data.labelled), "source_test": source_test},
        "target_accuracy": {"before": before["target"], "after": after["target"]},
        "target_error_reduction": (error_before - error_after) / error_before if error_before > 0 else 0.0,
        "source_accuracy": {"before": before["source"], "after": after["source"]},
        "forgetting": before["source"] - after["source"],  # > 0: source accuracy lost
        "method_stats": stats,
    }


def _write_adapted_run(run: LoadedRun, model: nn.Module, out_dir: Path, report: dict[str, Any], data: TargetData,
                       say: Progress) -> Path:
    """Stage the new run (files, weights, bundle, report), then move it into place in one rename."""
    from safetensors.torch import save as safetensors_bytes

    from lensforge.deploy.bundle import load_bundle, update_bundle
    from lensforge.deploy.from_run import export_run
    from lensforge.evaluate.runner import predict_table
    from lensforge.train.run import RUN_FILE, WEIGHTS_FILE, now_iso, versions
    from lensforge.utils.io import atomic_write_bytes, atomic_write_json, replace_dir, staging_dir

    tmp = staging_dir(out_dir)
    try:
        for name in DESCRIBING_FILES:
            if (run.path / name).exists():
                shutil.copy2(run.path / name, tmp / name)
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(tmp / WEIGHTS_FILE, safetensors_bytes(tensors))
        adapted_from = {"run": str(run.path), "method": report["method"], "target": data.spec,
                        "labels": len(data.labelled), "seed": report["settings"]["seed"]}
        atomic_write_json(tmp / RUN_FILE, {**run.info, "name": out_dir.name, "status": "complete",
                                           "created": now_iso(), "versions": versions(),
                                           "adapted_from": adapted_from})
        say("exporting the adapted model to a bundle")
        # The parity check runs on target images: the inputs this bundle is meant for.
        bundle = load_bundle(export_run(tmp, sample_images=data.table.images[data.adapt[:64]]))
        logits = predict_table(lambda x: bundle.predict_uint8(x)[0], data.table.images[data.held_out])
        held_targets = data.table.targets[data.held_out]
        report["target_accuracy"]["after_bundle"] = float((logits.argmax(axis=1) == held_targets).mean())
        report["created"] = now_iso()
        update_bundle(bundle, updates={"adaptation": {
            **adapted_from, **{k: report[k] for k in ("target_accuracy", "source_accuracy", "split")}}})
        atomic_write_json(tmp / REPORT_FILE, report)
        atomic_write_json(tmp / SPLIT_FILE, _split_origins(data, report["settings"]["seed"]))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "bundle"


def _split_origins(data: TargetData, seed: int) -> dict[str, Any]:
    """The target split by origin (like ``splits.json``), so the figures can be reproduced and audited."""
    origins = data.table.origins
    return {"target": data.spec, "how": data.how, "seed": seed,
            **{name: [origins[i] for i in getattr(data, name)] for name in ("adapt", "labelled", "held_out")}}
