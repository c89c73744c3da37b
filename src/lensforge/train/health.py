"""Gradient health during training: non-finite steps, explosions, vanishing layers.

The training loop keeps control (Lightning-Fabric style): it calls
:meth:`GradientHealthMonitor.after_backward` after every ``loss.backward()`` and acts
on the returned :class:`HealthAction`; the monitor only measures, records events and
turns them into advice.

Cost: every step one fused ``torch._foreach_norm`` over the gradients (the same
kernel ``clip_grad_norm_`` uses) and one host sync; per-layer norms are derived
from those per-tensor norms on check steps only, so they cost no extra pass.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lensforge.errors import ArtifactError, ConfigError

__all__ = ["GradientHealthMonitor", "HealthAction", "HealthEvent", "layer_groups"]

# Grouping: fewer than 3 groups says nothing about depth (e.g. a model wrapping one
# nn.Sequential), so such models are split one level deeper.
MIN_LAYER_GROUPS = 3
# A group holding over half of the parameter *tensors* is the trunk (efficientnet
# `blocks`, convnext `stages`) and is split into its stages. Tensor count rather
# than element count: resnet18's `layer4` holds 75% of the weights but is one stage.
DOMINANT_GROUP_SHARE = 0.5
# A norm below this is treated as exactly zero (fp32 gradients of a layer that still
# learns are far above it); it keeps ratios finite.
ZERO_NORM = 1e-12
# Explosions on this many steps are a pattern, not a fluke: advise a lower lr.
RECURRING_EXPLOSIONS = 3
# Clipping on most steps by a large factor means the clip norm, not the lr, sets the
# SGD step size (Adam-style optimizers divide the scale out, so mild clipping is
# harmless and common: clip 2 vs norm 3 is not worth a sentence).
MOSTLY_CLIPPED_SHARE = 0.5
CLIP_DOMINANT_FACTOR = 5.0
MIN_CLIP_REPORTS = 10
# History values keep 4 significant digits: enough to plot, a quarter of the JSON.
HISTORY_DIGITS = 4
STATE_VERSION = 1


class HealthAction(enum.Enum):
    """What the training loop should do with the step it just back-propagated."""

    OK = "ok"  # clip and step
    SKIP = "skip"  # non-finite loss or gradients: zero grads, back off the lr, no step
    RESTORE = "restore"  # non-finite for too long: reload the last good checkpoint


@dataclass
class HealthEvent:
    """One thing worth knowing about a step.

    Attributes:
        kind: ``nonfinite_loss``, ``nonfinite_grad``, ``exploding``, ``vanishing``,
            or a kind the loop reported via ``note_action`` (``restore``, ``lr_backoff``).
        layer: layer group at fault (``"conv1..layer1"`` for a range), if any.
        value: the measured number (total norm, norm ratio), ``None`` if non-finite.
        action: the monitor's verdict (``ok``/``skip``/``restore``), or ``loop`` for
            what the training loop reported it did.
    """

    step: int
    epoch: int | None
    kind: str
    layer: str | None
    value: float | None
    action: str
    message: str


def layer_groups(model: nn.Module, *, min_groups: int = MIN_LAYER_GROUPS) -> dict[str, list[str]]:
    """Group parameter names by module prefix at a readable depth.

    Starts from the first name component (resnet: ``conv1``, ``layer1``, ..., ``fc``)
    and splits a group one level deeper while there are fewer than ``min_groups``
    groups or one group holds most parameter tensors (efficientnet ``blocks`` ->
    ``blocks.0`` .. ``blocks.6``). Order is registration order, which for the
    models lensforge builds is the forward order (first = earliest layer). Frozen
    parameters are included: gradual fine-tuning unfreezes them later, and until then
    they simply have no gradients.
    """
    names = [name for name, _ in model.named_parameters()]
    groups: list[tuple[str, list[str]]] = _split_by_depth("", names)
    # Each split makes a prefix longer, so this ends; the bound guards odd models.
    for _ in range(64):
        index = _group_to_split(groups, len(names), min_groups)
        if index is None:
            break
        prefix, members = groups[index]
        groups[index : index + 1] = _split_by_depth(prefix, members)
    return dict(groups)


def _split_by_depth(prefix: str, names: list[str]) -> list[tuple[str, list[str]]]:
    """Group ``names`` (all under ``prefix``) by their next name component."""
    depth = prefix.count(".") + 1 if prefix else 0
    split: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        # A module's own parameters (prefix.weight next to prefix.child.*) keep the
        # prefix as their group so they are not scattered into one group per tensor.
        key = ".".join(parts[: depth + 1]) if len(parts) > depth + 1 else (prefix or name)
        split.setdefault(key, []).append(name)
    return list(split.items())


def _group_to_split(
    groups: list[tuple[str, list[str]]], total: int, min_groups: int
) -> int | None:
    """Index of the group to split next, or None when the grouping is readable."""

    def splittable(prefix: str, members: list[str]) -> bool:
        depth = prefix.count(".") + 1
        return any(name.count(".") > depth for name in members)

    candidates = [i for i, (prefix, members) in enumerate(groups) if splittable(prefix, members)]
    if not candidates:
        return None
    largest = max(candidates, key=lambda i: len(groups[i][1]))
    if len(groups) < min_groups or len(groups[largest][1]) > DOMINANT_GROUP_SHARE * total:
        return largest
    return None


class GradientHealthMonitor:
    """Watches gradients every step and records what goes wrong, with advice.

    Call :meth:`after_backward` after ``loss.backward()`` (after
    ``GradScaler.unscale_`` under fp16 autocast, so norms are real) and act on the
    returned :class:`HealthAction`. ``total_norm`` holds the last step's norm, so
    the loop can clip with ``clip_grads_with_norm_(params, clip_norm,
    torch.tensor(monitor.total_norm))`` without a second pass over the gradients.

    Args:
        model: the model being trained; parameters with a gradient are watched.
        every_n_steps: record per-layer norms (and check vanishing) on steps
            divisible by this.
        explode_factor: a total norm above this times the running median of recent
            finite norms is an explosion.
        vanish_ratio: an early layer whose norm is below this fraction of the head's
            norm is vanishing.
        max_consecutive_nonfinite: non-finite steps in a row before RESTORE.
        lr_backoff: factor the loop multiplies the lr by after SKIP or RESTORE.
        warmup_steps: finite steps seen before explosions are judged.
        window: number of recent total norms the running median is taken over.
        vanish_patience: consecutive check steps a layer must vanish before it is
            reported (one event per episode, not one per step).
        max_events: events kept in ``events``; later ones are only counted.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every_n_steps: int = 10,
        explode_factor: float = 10.0,
        vanish_ratio: float = 1e-3,
        max_consecutive_nonfinite: int = 3,
        lr_backoff: float = 0.5,
        warmup_steps: int = 20,
        window: int = 50,
        vanish_patience: int = 3,
        max_events: int = 500,
    ) -> None:
        _check_config(every_n_steps=every_n_steps, explode_factor=explode_factor,
                      vanish_ratio=vanish_ratio, lr_backoff=lr_backoff,
                      max_consecutive_nonfinite=max_consecutive_nonfinite,
                      warmup_steps=warmup_steps, window=window,
                      vanish_patience=vanish_patience, max_events=max_events)
        self.every_n_steps = every_n_steps
        self.explode_factor = explode_factor
        self.vanish_ratio = vanish_ratio
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.lr_backoff = lr_backoff
        self.warmup_steps = warmup_steps
        self.vanish_patience = vanish_patience
        self.max_events = max_events

        groups = layer_groups(model)
        if not groups:
            raise ConfigError("GradientHealthMonitor: the model has no parameters")
        params = dict(model.named_parameters())
        self.layer_names: list[str] = list(groups)
        # Parameters in group order, so the first non-finite tensor is in the earliest layer.
        self._params = [params[name] for members in groups.values() for name in members]
        self._group_of = [g for g, members in enumerate(groups.values()) for _ in members]
        self._recent: deque[float] = deque(maxlen=window)
        self.total_norm: float | None = None
        self._reset_records()

    def _reset_records(self) -> None:
        self._history: dict[str, Any] = {
            "step": [], "total": [], "layers": {name: [] for name in self.layer_names}
        }
        self.events: list[HealthEvent] = []
        self._tally: dict[str, dict[str, Any]] = {}  # kind -> count, first event, max value
        self._steps_seen = 0
        self._last_step: int = -1
        self._last_epoch: int | None = None
        self._nonfinite_streak = 0
        self._restores = 0
        self._vanish_since: int | None = None  # step the current vanishing streak began
        self._vanish_checks = 0
        self._last_explosion_logged: int | None = None
        self._clip_reports = 0
        self._clipped_steps = 0
        self._clip_norm: float | None = None

    # ------------------------------------------------------------------ per step
    def after_backward(
        self, loss: torch.Tensor | float | None, *, step: int | None = None,
        epoch: int | None = None,
    ) -> HealthAction:
        """Inspect the loss and gradients of one step and say what to do with it.

        Args:
            loss: the step's (detached) scalar loss; ``None`` checks gradients only.
            step: global optimisation step; counts from the last one if omitted.
            epoch: current epoch, only recorded in events.
        """
        step = self._last_step + 1 if step is None else int(step)
        self._last_step, self._last_epoch = step, epoch
        self._steps_seen += 1
        norms, positions = self._tensor_norms()
        loss_value, total = self._to_floats(loss, norms)
        self.total_norm = total
        if not (math.isfinite(loss_value) and math.isfinite(total)):
            return self._on_nonfinite(step, epoch, loss_value, norms, positions)
        self._nonfinite_streak = 0
        layer_norms: list[float | None] | None = None
        if step % self.every_n_steps == 0:
            layer_norms = self._layer_norms(norms, positions)
            self._record(step, total, layer_norms)
            self._check_vanishing(step, epoch, layer_norms)
        self._check_exploding(
            step, epoch, total, lambda: layer_norms or self._layer_norms(norms, positions)
        )
        self._recent.append(total)
        return HealthAction.OK

    def note_clipped(self, total_norm: torch.Tensor | float, clip_norm: float) -> None:
        """Tell the monitor the loop clipped this step's gradients (norm before clipping)."""
        norm = float(total_norm)
        self._clip_reports += 1
        self._clip_norm = float(clip_norm)
        if norm > clip_norm:
            self._clipped_steps += 1
            explosion = self._tally.get("exploding", {}).get("last")
            if explosion is not None and explosion.step == self._last_step:
                explosion.message += f": clipped to {clip_norm:g}"

    def note_action(self, kind: str, message: str) -> None:
        """Record what the loop did (e.g. ``("lr_backoff", "lr halved to 5e-4")``)."""
        event = HealthEvent(self._last_step, self._last_epoch, kind, None, None, "loop", message)
        self._emit(event)

    # --------------------------------------------------------------- measuring
    def _tensor_norms(self) -> tuple[torch.Tensor, list[int]]:
        """Per-tensor L2 norms (fp32, one device) of the gradients that exist."""
        grads, positions = [], []
        for position, param in enumerate(self._params):
            if param.grad is not None:
                grads.append(param.grad)
                positions.append(position)
        if not grads:
            return torch.zeros(0), positions
        # dtype=float32 so fp16 gradients cannot overflow their own norm.
        per_tensor = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        device = per_tensor[0].device
        return torch.stack([n.to(device) for n in per_tensor]), positions

    @staticmethod
    def _to_floats(loss: torch.Tensor | float | None, norms: torch.Tensor) -> tuple[float, float]:
        """Loss and total norm as floats, with a single host sync."""
        total = torch.linalg.vector_norm(norms) if norms.numel() else norms.new_zeros(())
        if isinstance(loss, torch.Tensor):
            pair = torch.stack([loss.detach().float().reshape(()).to(total.device), total])
            loss_value, total_value = pair.tolist()
            return loss_value, total_value
        return (0.0 if loss is None else float(loss)), float(total)

    def _layer_norms(self, norms: torch.Tensor, positions: list[int]) -> list[float | None]:
        """L2 norm per layer group; ``None`` for a group with no gradients this step."""
        if not positions:
            return [None] * len(self.layer_names)
        groups = [self._group_of[p] for p in positions]
        index = torch.tensor(groups, device=norms.device)
        squares = norms.new_zeros(len(self.layer_names)).index_add_(0, index, norms.square())
        present = set(groups)
        values = squares.sqrt().tolist()
        return [v if g in present else None for g, v in enumerate(values)]

    def _record(self, step: int, total: float, layer_norms: list[float | None]) -> None:
        self._history["step"].append(step)
        self._history["total"].append(_round(total))
        for name, value in zip(self.layer_names, layer_norms, strict=True):
            self._history["layers"][name].append(None if value is None else _round(value))

    # --------------------------------------------------------------- detecting
    def _on_nonfinite(
        self, step: int, epoch: int | None, loss_value: float, norms: torch.Tensor,
        positions: list[int],
    ) -> HealthAction:
        self._nonfinite_streak += 1
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        layer = self.layer_names[self._group_of[positions[bad[0]]]] if bad else None
        bad_loss = not math.isfinite(loss_value)
        restore = self._nonfinite_streak >= self.max_consecutive_nonfinite
        action = HealthAction.RESTORE if restore else HealthAction.SKIP
        what = f"loss is {loss_value}" if bad_loss else "gradients are non-finite"
        where = f"first non-finite gradients in {_label(layer)}" if layer else "gradients finite"
        if restore:
            then = f"{self._nonfinite_streak} non-finite steps in a row: restore a good checkpoint"
            self._nonfinite_streak = 0  # the restored run starts a fresh count
            self._restores += 1
        else:
            then = "step skipped"
        kind = "nonfinite_loss" if bad_loss else "nonfinite_grad"
        # value None: nan/inf is not valid JSON, and the message says which it was.
        self._emit(HealthEvent(step, epoch, kind, layer, None, action.value,
                               f"{what} at step {step}; {where}: {then}"))
        return action

    def _check_exploding(
        self, step: int, epoch: int | None, total: float,
        layer_norms: Callable[[], list[float | None]],
    ) -> None:
        if len(self._recent) < self.warmup_steps:
            return
        median = statistics.median(self._recent)
        if median < ZERO_NORM or total <= self.explode_factor * median:
            return
        # Per-layer norms only now: explosions are rare, so this costs nothing per step.
        norms = layer_norms()
        known = [(v, name) for name, v in zip(self.layer_names, norms, strict=True)
                 if v is not None]
        layer = max(known)[1] if known else None
        event = HealthEvent(
            step, epoch, "exploding", layer, _round(total), HealthAction.OK.value,
            f"{_label(layer)} gradients exploded at step {step} "
            f"(norm {_number(total)} vs median {_number(median)})",
        )
        # One logged event per window of steps: a burst is one story, all are counted.
        quiet = self._last_explosion_logged is None or (
            step - self._last_explosion_logged >= (self._recent.maxlen or 1)
        )
        if quiet:
            self._last_explosion_logged = step
        self._emit(event, log=quiet)

    def _check_vanishing(
        self, step: int, epoch: int | None, layer_norms: list[float | None]
    ) -> None:
        found = _vanishing_span(layer_norms, self.vanish_ratio)
        if found is None:
            self._vanish_since, self._vanish_checks = None, 0
            return
        if self._vanish_since is None:
            self._vanish_since = step
        self._vanish_checks += 1
        if self._vanish_checks != self.vanish_patience:
            return  # not yet sustained, or already reported for this episode
        first, last, ratio = found
        names = self.layer_names
        span = names[first] if first == last else f"{names[first]}..{names[last]}"
        label = _label(span) if first == last else _label(span).replace("layer ", "layers ")
        if ratio == 0.0:
            detail = f"all gradients below {ZERO_NORM:g}"
        else:
            detail = f"{ratio:.1g} of the head's norm"
        self._emit(HealthEvent(
            step, epoch, "vanishing", span, _round(ratio), HealthAction.OK.value,
            f"{label} gradients vanishing since step {self._vanish_since} ({detail})",
        ))

    def _emit(self, event: HealthEvent, *, log: bool = True) -> None:
        tally = self._tally.setdefault(event.kind, {"count": 0, "first": event, "max": None})
        tally["count"] += 1
        tally["last"] = event
        if event.value is not None:
            tally["max"] = event.value if tally["max"] is None else max(tally["max"], event.value)
        if log and len(self.events) < self.max_events:
            self.events.append(event)

    # --------------------------------------------------------------- reporting
    @property
    def history(self) -> dict[str, Any]:
        """``{"step": [...], "total": [...], "layers": {name: [...]}}`` at check steps."""
        return self._history

    def diagnosis(self) -> list[str]:
        """Short sentences naming each problem with advice, or one 'healthy' line."""
        sentences = [
            _nonfinite_sentence(self._count("nonfinite_loss") + self._count("nonfinite_grad"),
                                self._first("nonfinite_loss", "nonfinite_grad"),
                                self._restores),
            _exploding_sentence(self._count("exploding"), self._first("exploding")),
            _clipping_sentence(self._clip_reports, self._clipped_steps, self._clip_norm,
                               self._history["total"]),
            _vanishing_sentence(self._first("vanishing")),
        ]
        found = [s for s in sentences if s]
        return found or [_healthy_sentence(self._steps_seen, self._history)]

    def to_json(self) -> dict[str, Any]:
        """Everything a report needs: ``{"history", "events", "diagnosis"}``."""
        return {
            "history": self._history,
            "events": [asdict(e) for e in self.events],
            "diagnosis": self.diagnosis(),
        }

    def _count(self, kind: str) -> int:
        return self._tally.get(kind, {}).get("count", 0)

    def _first(self, *kinds: str) -> HealthEvent | None:
        firsts = [self._tally[k]["first"] for k in kinds if k in self._tally]
        return min(firsts, key=lambda e: e.step) if firsts else None

    # --------------------------------------------------------------- resuming
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state, so a resumed run keeps its history and running statistics."""
        tally = {
            kind: {"count": t["count"], "max": t["max"], "first": asdict(t["first"]),
                   "last": asdict(t["last"])}
            for kind, t in self._tally.items()
        }
        return {
            "version": STATE_VERSION,
            "layers": list(self.layer_names),
            "history": self._history,
            "events": [asdict(e) for e in self.events],
            "tally": tally,
            "recent": list(self._recent),
            "counters": {
                "steps_seen": self._steps_seen, "last_step": self._last_step,
                "last_epoch": self._last_epoch, "nonfinite_streak": self._nonfinite_streak,
                "restores": self._restores,
                "vanish_since": self._vanish_since, "vanish_checks": self._vanish_checks,
                "last_explosion_logged": self._last_explosion_logged,
                "clip_reports": self._clip_reports, "clipped_steps": self._clipped_steps,
                "clip_norm": self._clip_norm,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the model must have the same layer groups."""
        if state.get("version") != STATE_VERSION:
            raise ArtifactError(f"gradient health state has version {state.get('version')!r}, "
                                f"expected {STATE_VERSION}")
        if list(state["layers"]) != self.layer_names:
            raise ArtifactError(
                f"gradient health state was recorded for layers {list(state['layers'])}, "
                f"but this model has {self.layer_names}"
            )
        self._reset_records()
        history = state["history"]
        self._history = {"step": list(history["step"]), "total": list(history["total"]),
                         "layers": {k: list(v) for k, v in history["layers"].items()}}
        self.events = [HealthEvent(**e) for e in state["events"]]
        self._tally = {
            kind: {"count": t["count"], "max": t["max"], "first": HealthEvent(**t["first"]),
                   "last": HealthEvent(**t["last"])}
            for kind, t in state["tally"].items()
        }
        self._recent.extend(state["recent"])
        counters = state["counters"]
        self._steps_seen = counters["steps_seen"]
        self._last_step, self._last_epoch = counters["last_step"], counters["last_epoch"]
        self._nonfinite_streak = counters["nonfinite_streak"]
        self._restores = counters["restores"]
        self._vanish_since = counters["vanish_since"]
        self._vanish_checks = counters["vanish_checks"]
        self._last_explosion_logged = counters["last_explosion_logged"]
        self._clip_reports = counters["clip_reports"]
        self._clipped_steps = counters["clipped_steps"]
        self._clip_norm = counters["clip_norm"]


def _vanishing_span(
    layer_norms: list[float | None], vanish_ratio: float
) -> tuple[int, int, float] | None:
    """(first, last, smallest ratio) of the leading layers whose gradients vanish.

    The reference is the larger norm of the last two layers (the head; two so a
    small final norm layer does not hide the classifier). Layers without gradients
    are stepped over. If even the head is ~0, every layer counts, with ratio 0.
    """
    known = [(i, v) for i, v in enumerate(layer_norms) if v is not None]
    if len(known) < 2:
        return None
    reference = max(v for _, v in known[-2:])
    if reference < ZERO_NORM:
        return known[0][0], known[-1][0], 0.0
    span: list[tuple[int, float]] = []
    for index, value in known[:-1]:
        if value >= vanish_ratio * reference:
            break
        span.append((index, value / reference))
    if not span:
        return None
    return span[0][0], span[-1][0], min(ratio for _, ratio in span)


def _nonfinite_sentence(count: int, first: HealthEvent | None, restores: int) -> str | None:
    if not count or first is None:
        return None
    where = f", first non-finite gradients in {_label(first.layer)}" if first.layer else ""
    restored = f"; {restores} checkpoint restore(s)" if restores else ""
    return (
        f"non-finite loss or gradients on {count} step(s) (first at step {first.step}{where})"
        f"{restored}: lower the learning rate (--lr), keep gradient clipping on, check the "
        "data for NaN/inf pixels or labels, and prefer bf16 to fp16 autocast"
    )


def _exploding_sentence(count: int, first: HealthEvent | None) -> str | None:
    if not count or first is None:
        return None
    summary = f"gradients exploded on {count} step(s), first: {first.message}"
    if count >= RECURRING_EXPLOSIONS:
        return (f"{summary}; explosions keep recurring: lower the learning rate (halve --lr) "
                "or lengthen the lr warm-up (warmup_epochs)")
    return f"{summary}; a one-off that clipping contains, no change needed unless it recurs"


def _clipping_sentence(
    reports: int, clipped: int, clip_norm: float | None, totals: list[float]
) -> str | None:
    if reports < MIN_CLIP_REPORTS or clipped <= MOSTLY_CLIPPED_SHARE * reports:
        return None
    if not totals or not clip_norm:
        return None
    factor = statistics.median(totals) / clip_norm
    if factor < CLIP_DOMINANT_FACTOR:
        return None
    return (
        f"gradients clipped on {clipped / reports:.0%} of steps, typically by {factor:.0f}x "
        f"(median norm {_number(statistics.median(totals))} vs clip {clip_norm:g}): with SGD "
        f"that is a {factor:.0f}x smaller learning rate (AdamW barely notices); lower --lr "
        "or raise clip_grad_norm"
    )


def _vanishing_sentence(first: HealthEvent | None) -> str | None:
    if first is None:
        return None
    return (
        f"{first.message}: early layers barely learn; use ReLU/GELU/SiLU instead of "
        "sigmoid/tanh, add BatchNorm/LayerNorm or residual connections, use He (kaiming) "
        "init, or pick a registered architecture that has them (e.g. resnet)"
    )


def _healthy_sentence(steps_seen: int, history: dict[str, Any]) -> str:
    totals = history["total"]
    if not totals:
        return f"gradients healthy: no problems in {steps_seen} step(s)"
    return (
        f"gradients healthy: total norm median {statistics.median(totals):.3g} "
        f"(range {min(totals):.3g}-{max(totals):.3g}) over {steps_seen} step(s); no non-finite "
        "values, explosions or vanishing layers"
    )


def _label(layer: str | None) -> str:
    """Readable layer name in a sentence: ``nn.Sequential`` indices read as "layer 3"."""
    if layer is None:
        return "some layer"
    return f"layer {layer}" if layer[0].isdigit() else layer


def _number(value: float) -> str:
    """532 rather than 5.32e+02; small values keep 3 significant digits."""
    return f"{value:.0f}" if 100 <= abs(value) < 1e7 else f"{value:.3g}"


def _round(value: float) -> float:
    return float(f"{value:.{HISTORY_DIGITS}g}")


def _check_config(**options: float) -> None:
    """Reject option values that cannot work, naming the option."""
    positive_ints = ("every_n_steps", "max_consecutive_nonfinite", "window", "vanish_patience")
    for name, value in options.items():
        if name in positive_ints and (int(value) != value or value < 1):
            raise ConfigError(
                f"GradientHealthMonitor: {name} must be an integer >= 1, got {value!r}"
            )
    if not options["explode_factor"] > 1:
        raise ConfigError(f"GradientHealthMonitor: explode_factor must be > 1, "
                          f"got {options['explode_factor']!r}")
    if not 0 < options["vanish_ratio"] < 1:
        raise ConfigError(f"GradientHealthMonitor: vanish_ratio must be in (0, 1), "
                          f"got {options['vanish_ratio']!r}")
    if not 0 < options["lr_backoff"] <= 1:
        raise ConfigError(f"GradientHealthMonitor: lr_backoff must be in (0, 1], "
                          f"got {options['lr_backoff']!r}")
    if options["max_events"] < 0:
        raise ConfigError("GradientHealthMonitor: max_events must be >= 0")
    if not 0 <= options["warmup_steps"] <= options["window"]:
        # The running median only ever holds `window` norms: a longer warm-up never ends.
        raise ConfigError(f"GradientHealthMonitor: warmup_steps must be in [0, window="
                          f"{options['window']}], got {options['warmup_steps']!r}")
