"""Plan a run to fit a time budget on *this* machine: measure first, then choose the epochs.

A short pilot times real optimizer steps (forward, backward, AdamW) of the chosen model at
its input size and batch on random pixels, and a forward pass for evaluation; decoding is
timed on a sample of the data. From those, the plan takes the epochs that fit what the
budget leaves after data loading and the steps after training (export, evaluation,
calibration, guardrails, quick stress suite, all on bounded subsamples), so the learning-rate
schedule is built for the length that will really run. A pretrained backbone trained with
``transfer: probe`` (:mod:`lensforge.train.probe`) first runs one forward pass over the
training and validation images for its linear probe: the pilot times that pass too (at the
probe's precision) and the plan reserves it before the epochs. Training also gets a hard time limit
(``TrainConfig.time_limit_s``) in case the estimate was optimistic; the best epoch is kept.

Written here rather than taken from a library: AutoGluon's ``time_limit`` and Ultralytics'
``time=`` do the same for their own trainers but cannot plan ours.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from lensforge.errors import LensforgeError, UsageError

# The pilot misses augmentation, health checks and Python overhead of the real loop:
# measured loops run 10-25% slower than bare steps on tiny models, so plan with this margin.
STEP_MARGIN = 1.25
# No --time-budget: as long as the full default schedule needs, within these bounds (seconds).
DEFAULT_BUDGET_S = (60.0, 300.0)
PILOT_SECONDS = 3.0  # timing stops after this much pilot work (or PILOT_STEPS steps)
PILOT_STEPS = 4
DECODE_SAMPLE = 48  # images decoded to estimate the decoding time of the whole source
# what the steps after training run, in forward passes per evaluated image (see autopilot):
STRESS_PASSES = 40  # ~25 corruption/severity pairs of the quick suite + shifts and jitters
STRESS_IMAGES = 1000  # the quick suite's subsample
GUARD_IMAGES = 5000  # guardrails fit on at most this many images per split
OOD_IMAGES = 5 * 256  # five built-in OOD sets of 256 images
FIXED_AFTER_S = 8.0  # report, bundle hashing, detector fits, process start-up of each step


class BudgetTooSmall(LensforgeError):
    """The time budget cannot hold even one epoch; the message says what would fit (exit code 3)."""

    exit_code = 3


@dataclass(frozen=True)
class Plan:
    """What will run and how long each part is expected to take (seconds)."""

    budget_s: float
    budget_given: bool
    model: str
    image_size: int
    batch_size: int
    epochs: int
    steps_per_epoch: int
    seconds_per_step: float  # with STEP_MARGIN
    seconds_per_image_forward: float
    num_train: int
    num_val: int
    num_test: int
    data_s: float
    pilot_s: float
    train_s: float  # planned training time: the epochs' steps and validation
    after_s: float  # export, evaluation, calibration, guardrails, stress
    probe_s: float = 0.0  # the linear probe's forward pass over train + val (transfer: probe), before the epochs

    @property
    def total_s(self) -> float:
        return self.pilot_s + self.data_s + self.probe_s + self.train_s + self.after_s

    @property
    def train_limit_s(self) -> float:
        """The hard stop for the training loop: what the budget leaves after everything else."""
        return max(self.train_s, self.budget_s - self.pilot_s - self.data_s - self.probe_s - self.after_s)

    @property
    def epoch_s(self) -> float:
        return self.steps_per_epoch * self.seconds_per_step + self.num_val * self.seconds_per_image_forward

    def describe(self) -> str:
        """One line for people: what was planned, and against which budget."""
        why = "budget" if self.budget_given else "default budget for data of this size"
        probe = f"a linear probe (~{_human(self.probe_s)}) then " if self.probe_s else ""
        return (f"planned {probe}{self.epochs} epoch{'s' * (self.epochs != 1)} of {self.model} at {self.image_size} px "
                f"(batch {self.batch_size}, {self.num_train:,} training images): ~{_human(self.train_s)} training, "
                f"~{_human(self.total_s)} in all ({why} {_human(self.budget_s)})")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(total_s=self.total_s, epoch_s=self.epoch_s, train_limit_s=self.train_limit_s)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def parse_duration(text: str | float | int | None, option: str = "--time-budget") -> float | None:
    """``"90s"``, ``"10m"``, ``"1.5h"``, ``"1h30m"`` or plain seconds -> seconds; None stays None.

    ``option`` names the flag in the error message (``--time-budget``, ``--timeout``).
    """
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        cleaned = str(text).strip().lower().replace(" ", "")
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)(s)?)?", cleaned)
        # a bare number after hours or minutes ("1h30") is ambiguous: refused rather than guessed
        if (not cleaned or parts is None or not any(parts.groups()[:3])
                or (parts.group(3) and not parts.group(4) and (parts.group(1) or parts.group(2)))):
            raise UsageError(f"{option}: {text!r} is not a duration (e.g. 90s, 10m, 1h30m or plain seconds)")
        hours, minutes, secs = (float(g) if g else 0.0 for g in parts.groups()[:3])
        seconds = hours * 3600 + minutes * 60 + secs
    if not seconds > 0:
        raise UsageError(f"{option}: {text!r} must be more than 0 seconds")
    return seconds


def plan_run(cfg: Any, *, budget_s: float | None = None, include_after: bool = True) -> Plan:
    """Measure this machine on ``cfg``'s model and data, and choose the epochs that fit ``budget_s``.

    ``cfg`` is a :class:`lensforge.train.config.TrainConfig`; its ``epochs`` is the most the plan
    takes. Without ``budget_s`` the budget is what those epochs need, clamped to
    ``DEFAULT_BUDGET_S``. ``include_after`` reserves time for autopilot's steps after training.

    Raises:
        BudgetTooSmall: not even one epoch fits; the message gives the budget that would.
    """
    from lensforge.data.sources import open_source
    from lensforge.train.setup import resolve

    started = time.perf_counter()
    source = open_source(cfg.data)
    counts = split_counts(source, cfg.val_fraction, cfg.test_fraction)
    resolved = resolve(cfg, source, counts[0])
    step_s, forward_s, probe_forward_s = measure_steps(resolved, len(source.class_names), cfg)
    data_s = estimate_decode_s(source, resolved)
    probe_s = (counts[0] + counts[1]) * probe_forward_s
    pilot_s = time.perf_counter() - started
    steps_per_epoch = max(1, counts[0] // resolved.batch_size)
    if cfg.max_train_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.max_train_batches)
    after_s = estimate_after_s(*counts, forward_s, resolved) if include_after else 0.0
    draft = Plan(0.0, budget_s is not None, resolved.model_name, resolved.image_size, resolved.batch_size,
                 cfg.epochs, steps_per_epoch, step_s, forward_s, *counts, data_s, pilot_s, 0.0, after_s, probe_s)
    epoch_s = draft.epoch_s
    before_s = pilot_s + data_s + probe_s  # everything before the first epoch
    full_s = before_s + cfg.epochs * epoch_s + after_s
    budget = budget_s if budget_s is not None else min(max(full_s, DEFAULT_BUDGET_S[0]), DEFAULT_BUDGET_S[1])
    room = budget - before_s - after_s
    need = before_s + epoch_s + after_s
    if room < epoch_s and budget_s is None:  # no budget was asked for: one epoch, however long
        budget, room = need, epoch_s
    if room < epoch_s:
        raise BudgetTooSmall(
            f"time budget {_human(budget)} is too small: loading the data ~{_human(data_s)}, "
            f"{f'the linear probe ~{_human(probe_s)}, ' if probe_s else ''}one epoch of "
            f"{resolved.model_name} at {resolved.image_size} px ~{_human(epoch_s)}, the steps after training "
            f"~{_human(after_s)}; at least ~{_human(math.ceil(need))} would fit one epoch")
    epochs = max(1, min(cfg.epochs, int(room // epoch_s)))
    return Plan(budget, budget_s is not None, resolved.model_name, resolved.image_size, resolved.batch_size, epochs,
                steps_per_epoch, step_s, forward_s, *counts, data_s, pilot_s, epochs * epoch_s, after_s, probe_s)


def split_counts(source: Any, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) image counts: the source's own splits, or the configured fractions."""
    n = len(source.records)
    fixed = [r.split for r in source.records]
    if any(s is not None for s in fixed):
        train, val, test = (sum(s == name for s in fixed) for name in ("train", "val", "test"))
        if val == 0:  # a train/test folder: validation is carved out of train
            val = int(round(train * val_fraction))
            train -= val
        return train, val, test
    val, test = int(round(n * val_fraction)), int(round(n * test_fraction))
    return n - val - test, val, test


def measure_steps(resolved: Any, num_classes: int, cfg: Any) -> tuple[float, float, float]:
    """Seconds per optimizer step at the planned batch, per image of an eval forward pass, and per
    image of the linear probe's forward pass (0 when the run does not probe).

    Large models are timed on a smaller batch and scaled per image, so the pilot stays short.
    A pretrained model's steps are timed with the layers its last epoch trains (see
    :func:`lensforge.train.optim.apply_transfer`: with ``transfer: probe`` the early stages stay
    frozen, and a backward pass that stops at the top half costs ~3x less): its costliest epoch.
    """
    import torch

    from lensforge.train.optim import apply_transfer, build_optimizer
    from lensforge.train.setup import build_model

    model, _ = build_model(resolved, num_classes)
    model.to(resolved.device)
    if resolved.channels_last:
        model.to(memory_format=torch.channels_last)
    if resolved.pretrained:
        apply_transfer(model, resolved.transfer, cfg.epochs - 1, cfg.epochs)
    optimizer = build_optimizer(model, cfg, resolved.lr, 1.0)
    generator = torch.Generator().manual_seed(0)
    batch = resolved.batch_size

    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, resolved.channels, resolved.image_size, resolved.image_size, generator=generator)
        y = torch.randint(0, num_classes, (n,), generator=generator)
        return x.to(resolved.device), y.to(resolved.device)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing).backward()
        optimizer.step()

    model.train()
    x, y = inputs(batch)
    first = _timed(lambda: step(x, y))
    if first > PILOT_SECONDS / 2 and batch > 8:  # big model: time a smaller batch, scale per image
        batch = max(4, batch // 8)
        x, y = inputs(batch)
        step(x, y)
    times = []
    while len(times) < PILOT_STEPS and sum(times) < PILOT_SECONDS:
        times.append(_timed(lambda: step(x, y)))
    per_image = sorted(times)[len(times) // 2] / batch
    model.eval()
    with torch.no_grad():
        xe, _ = inputs(min(batch * 2, 256))
        model(xe)
        forward = min(_timed(lambda: model(xe)) for _ in range(2)) / len(xe)
    return per_image * resolved.batch_size * STEP_MARGIN, forward, _probe_forward_s(model, xe, resolved, forward)


def _probe_forward_s(model: Any, x: Any, resolved: Any, fp32_forward_s: float) -> float:
    """Per-image seconds of the probe's feature pass: as timed above, or again under bf16 autocast if it uses it."""
    from lensforge.train.probe import probe_bf16

    if resolved.transfer != "probe" or not resolved.pretrained:
        return 0.0
    if not probe_bf16(resolved.device, resolved.amp):
        return fp32_forward_s
    import torch

    from lensforge.train.loop import autocast

    def forward() -> None:
        with torch.no_grad(), autocast(resolved.device, True):
            model(x)

    forward()
    return min(_timed(forward) for _ in range(2)) / len(x)


def estimate_decode_s(source: Any, resolved: Any) -> float:
    """Seconds to decode the whole source, from a sample (decoding runs on a thread pool)."""
    import os

    from lensforge.data.preprocess import Preprocess
    from lensforge.data.table import _decode_one
    from lensforge.errors import DataError

    records = source.records
    sample = records[:: max(1, len(records) // DECODE_SAMPLE)][:DECODE_SAMPLE]
    pre = Preprocess(input_size=(resolved.image_size, resolved.image_size), channels=resolved.channels,
                     mean=(0.5,) * resolved.channels, std=(0.5,) * resolved.channels)
    started = time.perf_counter()
    for record in sample:
        try:
            _decode_one(source, record, pre)
        except DataError:
            continue
    per_image = (time.perf_counter() - started) / max(1, len(sample))
    parallel = 1 if source.arrays is not None else min(2, os.cpu_count() or 1)
    return per_image * len(records) / parallel


def estimate_after_s(num_train: int, num_val: int, num_test: int, forward_s: float, resolved: Any) -> float:
    """Export, test evaluation, calibration, guardrails and the quick stress suite, in seconds."""
    passes = (num_test  # evaluation
              + num_val + num_test  # calibration
              + min(num_train, GUARD_IMAGES) + min(num_val, GUARD_IMAGES) + OOD_IMAGES  # guardrails
              + min(num_test, STRESS_IMAGES) * STRESS_PASSES)  # quick stress suite
    return FIXED_AFTER_S + passes * forward_s


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _human(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
