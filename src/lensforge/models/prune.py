"""Structured channel pruning with Torch-Pruning, and replaying it on a freshly built model.

Torch-Pruning's dependency graph removes whole channels from every layer that shares
them (convs, norms, residual adds, the classifier's inputs), so the pruned model is a
smaller dense model that really runs faster, not a masked one. Pruning is local: every
prunable group keeps ``int(channels * (1 - ratio))`` channels (rounded down to
``round_to``), whatever the weights, so the pruned *shapes* follow from the op alone.
That is what lets a run store pruned weights as plain safetensors plus a small JSON op
(:attr:`PruneReport.structure`) and rebuild the model later with
:func:`replay_structure`; a fingerprint of the shapes in the op makes replay fail loudly,
not silently, if that ever stops holding (e.g. another Torch-Pruning version).

Checked to replay exactly: timm ``resnet18``, ``resnet10t``, ``mobilenetv3_small_100``,
``tf_efficientnet_lite0`` and our ``tinycnn_*`` (tests/compress/test_prune.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import torch
from torch import nn

from lensforge.errors import ArtifactError, UsageError

IMPORTANCES = ("l2", "l1", "random", "taylor")
PRUNE_OP = "prune"

ModuleRef = nn.Module | str


@dataclass(frozen=True)
class PruneStep:
    """Where an iterative pruning schedule stands, passed to ``on_step`` after each step.

    Attributes:
        step: steps done so far (1-based); ``step == steps`` is the last.
        steps: total number of steps.
        ratio: channel ratio removed so far (of the original channels).
        params: parameter count now.
        macs: multiply-accumulates for one ``example_input`` now.
    """

    step: int
    steps: int
    ratio: float
    params: int
    macs: int


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune_model` did.

    Attributes:
        params_before, params_after: parameter counts.
        macs_before, macs_after: multiply-accumulates for one ``example_input``
            (``tp.utils.count_ops_and_params``).
        ratio: channel ratio removed from every prunable group.
        steps: number of pruning steps (fine-tuning may happen between them).
        importance: channel-importance criterion used.
        structure: JSON-able op for :func:`replay_structure` (store it next to the weights).
    """

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    ratio: float
    steps: int
    importance: str
    structure: dict[str, Any]

    @property
    def macs_reduction(self) -> float:
        """MACs before / after (2.0 = half the compute); latency gains are smaller."""
        return self.macs_before / max(self.macs_after, 1)

    @property
    def params_reduction(self) -> float:
        """Parameters before / after."""
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "macs_reduction": self.macs_reduction,
                "params_reduction": self.params_reduction}


def prune_model(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ratio: float,
    iterative_steps: int = 1,
    importance: str = "l2",
    ignored_layers: Sequence[ModuleRef] | None = None,
    round_to: int | None = None,
    on_step: Callable[[PruneStep], None] | None = None,
    taylor_loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> PruneReport:
    """Remove ``ratio`` of the channels of every prunable layer group of ``model``, in place.

    Args:
        model: a timm-style classifier (``get_classifier()``); its train/eval flags are kept.
        example_input: one input batch (N, C, H, W) for tracing and counting MACs.
        ratio: fraction of channels removed per group, in (0, 1); parameters drop by
            about 1 - (1 - ratio)^2.
        iterative_steps: reach ``ratio`` in this many equal steps; ``on_step`` runs after
            each, so the caller can fine-tune in between.
        importance: which channels go: "l2" / "l1" (group weight magnitude), "random",
            or "taylor" (|weight x gradient|; needs ``taylor_loss``).
        ignored_layers: modules (or their names) left unpruned besides the classifier,
            whose outputs (the logits) are always kept.
        round_to: keep channel counts multiples of this (e.g. 8 for SIMD-friendly sizes).
        on_step: called with a :class:`PruneStep` after every step.
        taylor_loss: for "taylor": ``loss = taylor_loss(model)`` on a few real batches;
            it is back-propagated before each step.

    Raises:
        UsageError: a bad ratio, step count, importance, ``round_to`` or ignored layer.
    """
    _check_args(ratio, iterative_steps, importance, round_to)
    if importance == "taylor" and taylor_loss is None:
        raise UsageError("importance 'taylor' needs taylor_loss (a function model -> loss on real batches)")
    example_input = _on_model_device(model, example_input)
    ignored = _ignored_modules(model, ignored_layers)
    macs_before, params_before = _count(model, example_input)
    with _kept_train_flags(model):
        pruner = _build_pruner(model, example_input, ratio=ratio, iterative_steps=iterative_steps,
                               importance=importance, ignored=ignored, round_to=round_to)
    for step in range(1, iterative_steps + 1):
        if taylor_loss is not None and importance == "taylor":
            _accumulate_gradients(model, taylor_loss)
        pruner.step()
        model.zero_grad(set_to_none=True)  # gradients of removed channels are meaningless now
        sync_model_attributes(model, example_input)
        if on_step is not None:
            macs, params = _count(model, example_input)
            on_step(PruneStep(step=step, steps=iterative_steps, ratio=ratio * step / iterative_steps,
                              params=params, macs=macs))
    macs_after, params_after = _count(model, example_input)
    structure = _structure_op(model, ratio, iterative_steps, round_to, importance, ignored)
    return PruneReport(params_before=params_before, params_after=params_after, macs_before=macs_before,
                       macs_after=macs_after, ratio=ratio, steps=iterative_steps, importance=importance,
                       structure=structure)


def _structure_op(model: nn.Module, ratio: float, iterative_steps: int, round_to: int | None, importance: str,
                  ignored: Any) -> dict[str, Any]:
    """The JSON-able record of a pruning, enough for :func:`replay_structure` to rebuild the shapes."""
    return {
        "op": PRUNE_OP,
        "ratio": ratio,
        "iterative_steps": iterative_steps,
        "round_to": round_to,
        "importance": importance,
        "ignored": [name for name, module in model.named_modules() if module in ignored and name],
        "torch_pruning": _torch_pruning_version(),
        "shapes_sha256": shapes_fingerprint(model),
    }


def replay_structure(model: nn.Module, ops: Sequence[dict[str, Any]], example_input: torch.Tensor) -> nn.Module:
    """Give a freshly built model of the same architecture the shapes recorded in ``ops``.

    The weights afterwards are arbitrary; load the saved pruned weights with
    ``load_state_dict(..., strict=True)``. Ops are applied in order, so a model pruned
    twice replays both. Returns ``model`` (changed in place).

    Raises:
        ArtifactError: an op lensforge does not know, or the replayed shapes differ from
            the recorded ones (different architecture or Torch-Pruning version).
    """
    example_input = _on_model_device(model, example_input)
    for index, op in enumerate(ops):
        where = f"structure op {index}"
        if not isinstance(op, dict) or op.get("op") != PRUNE_OP:
            found = op.get("op") if isinstance(op, dict) else type(op).__name__
            raise ArtifactError(f"{where}: unknown op {found!r} (this lensforge replays {PRUNE_OP!r})")
        try:
            ratio, steps, round_to = float(op["ratio"]), int(op["iterative_steps"]), op.get("round_to")
            names = list(op.get("ignored", []))
            _check_args(ratio, steps, "l2", round_to)
        except (KeyError, TypeError, ValueError, UsageError) as e:
            raise ArtifactError(f"{where}: invalid prune op {op!r} ({e})") from None
        modules = dict(model.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ArtifactError(f"{where}: the model has no module {missing[0]!r} (pruned model of another "
                                f"architecture?)")
        ignored = _ignored_modules(model, [modules[name] for name in names])
        with _kept_train_flags(model):
            # the kept channels' identity does not matter here (weights are loaded next), only their count
            pruner = _build_pruner(model, example_input, ratio=ratio, iterative_steps=steps, importance="l2",
                                   ignored=ignored, round_to=round_to)
        for _ in range(steps):
            pruner.step()
        sync_model_attributes(model, example_input)
        expected = op.get("shapes_sha256")
        if expected is not None and shapes_fingerprint(model) != expected:
            raise ArtifactError(
                f"{where}: replaying prune ratio {ratio} on {type(model).__name__} gives other shapes than "
                f"recorded (pruned with torch-pruning {op.get('torch_pruning')}, replayed with "
                f"{_torch_pruning_version()}, or another architecture)")
    return model


def sync_model_attributes(model: nn.Module, example_input: torch.Tensor) -> None:
    """Update the width attributes Torch-Pruning leaves stale, measured by a forward pass.

    timm's ``num_features`` (channels out of ``forward_features``), ``head_hidden_size``
    (size of ``forward_head(pre_logits=True)``), ``head.in_features``/``head.num_features``
    of timm's classifier-head modules, ``feature_info[i]["num_chs"]`` and our TinyCNN's
    ``num_features``: ``reset_classifier``, feature extraction and the logits+features
    ONNX export read them.
    """
    example_input = _on_model_device(model, example_input)
    if not all(callable(getattr(model, name, None)) for name in ("forward_features", "forward_head")):
        return
    stage_channels = _feature_info_channels(model, example_input)
    with _kept_train_flags(model), torch.no_grad():
        model.eval()
        features = model.forward_features(example_input[:1])
        pre_logits = model.forward_head(features, pre_logits=True)
    if isinstance(getattr(model, "num_features", None), int):
        model.num_features = int(features.shape[1])
    if isinstance(getattr(model, "head_hidden_size", None), int):
        model.head_hidden_size = int(pre_logits.shape[1])
    head = getattr(model, "head", None)  # timm's ClassifierHead / NormMlpClassifierHead keep widths too
    if isinstance(head, nn.Module) and not isinstance(head, nn.Linear):
        if isinstance(getattr(head, "in_features", None), int):
            head.in_features = int(features.shape[1])
        if isinstance(getattr(head, "num_features", None), int):
            head.num_features = int(pre_logits.shape[1])
    for info, channels in stage_channels:
        info["num_chs"] = channels


def shapes_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every state-dict entry's name and shape (what ``load_state_dict`` checks)."""
    shapes = [[name, list(tensor.shape)] for name, tensor in model.state_dict().items()]
    return hashlib.sha256(json.dumps(shapes, separators=(",", ":")).encode()).hexdigest()


def _check_args(ratio: float, iterative_steps: int, importance: str, round_to: int | None) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise UsageError(f"pruning ratio must be a number between 0 and 1 (exclusive), not {ratio!r}")
    if isinstance(iterative_steps, bool) or not isinstance(iterative_steps, int) or iterative_steps < 1:
        raise UsageError(f"iterative_steps must be an integer >= 1, not {iterative_steps!r}")
    if importance not in IMPORTANCES:
        raise UsageError(f"unknown pruning importance {importance!r}; choose one of {', '.join(IMPORTANCES)}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise UsageError(f"round_to must be an integer >= 1 or None, not {round_to!r}")


def _build_pruner(model: nn.Module, example_input: torch.Tensor, *, ratio: float, iterative_steps: int,
                  importance: str, ignored: set[nn.Module], round_to: int | None) -> Any:
    import torch_pruning as tp

    criteria = {
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "random": tp.importance.RandomImportance,
        "taylor": tp.importance.GroupTaylorImportance,
    }
    with warnings.catch_warnings():
        # Torch-Pruning warns about every parameter outside a prunable layer (e.g. layer-scale
        # gammas); they are handled as unwrapped parameters and the warnings are noise here.
        warnings.simplefilter("ignore", UserWarning)
        return tp.pruner.BasePruner(
            model, example_input, importance=criteria[importance](), pruning_ratio=ratio,
            ignored_layers=list(ignored), global_pruning=False,  # uniform: shapes follow from the ratio
            iterative_steps=iterative_steps, round_to=round_to,
        )


def _ignored_modules(model: nn.Module, extra: Sequence[ModuleRef] | None) -> set[nn.Module]:
    """The classifier (always: pruning its outputs would change the classes) plus ``extra``."""
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        raise UsageError(f"{type(model).__name__} has no get_classifier(): pruning needs timm's model interface")
    modules = dict(model.named_modules())
    ignored = {get_classifier()}
    for ref in extra or ():
        if isinstance(ref, str):
            if ref not in modules:
                raise UsageError(f"ignored layer {ref!r} is not a module of {type(model).__name__}")
            ignored.add(modules[ref])
        elif isinstance(ref, nn.Module) and any(ref is module for module in modules.values()):
            ignored.add(ref)
        else:
            raise UsageError(f"ignored layer {type(ref).__name__} is not a module of {type(model).__name__}")
    return ignored


def _accumulate_gradients(model: nn.Module, taylor_loss: Callable[[nn.Module], torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    loss = taylor_loss(model)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.requires_grad:
        raise UsageError("taylor_loss must return a scalar loss tensor computed from the model's output")
    loss.backward()


def _count(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """(MACs, params) for ``example_input``; Torch-Pruning counts on a copy in eval mode."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)


def _feature_info_channels(model: nn.Module, example_input: torch.Tensor) -> list[tuple[dict[str, Any], int]]:
    """(timm feature_info entry, measured output channels of its module) for each entry."""
    infos = getattr(model, "feature_info", None)
    if not isinstance(infos, list):
        return []
    modules = dict(model.named_modules())
    entries = [info for info in infos if isinstance(info, dict) and info.get("module") in modules]
    seen: dict[str, int] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.ndim >= 2:
                seen[name] = int(output.shape[1])
        return hook

    hooks = [modules[info["module"]].register_forward_hook(recorder(info["module"])) for info in entries]
    try:
        with _kept_train_flags(model), torch.no_grad():
            model.eval()
            model(example_input[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return [(info, seen[info["module"]]) for info in entries if info["module"] in seen]


@contextlib.contextmanager
def _kept_train_flags(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag (Torch-Pruning's tracer calls model.eval())."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _on_model_device(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or example_input.ndim != 4 or len(example_input) < 1:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input)
        raise UsageError(f"example_input must be an image batch tensor (N, C, H, W), not {shape}")
    device = next((p.device for p in model.parameters()), example_input.device)
    return example_input.to(device)


def _torch_pruning_version() -> str:
    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
        import torch_pruning

        return str(getattr(torch_pruning, "__version__", "unknown"))
