"""Linear probe on cached frozen features: the first step of training a pretrained backbone.

Why: on a CPU, a training step through EfficientNet-style depthwise convolutions costs ~5x
a forward pass (BENCHMARKS.md, "Pretrained backbones on a CPU budget"), and fine-tuning a
freshly initialised head through the whole network spends its first epochs teaching the
head what one forward pass already knows. So the backbone runs *once* over the training and
validation images (eval mode, no grad, channels-last, bf16 autocast where the CPU has AMX),
the pooled features are cached (in this process and in the run folder, keyed by the images,
the preprocessing and the backbone's weights), and the classifier is fitted on them in a
fraction of a second: full-batch L-BFGS on standardised features, the L2 strength chosen on
the validation split. The fitted head goes into the model, which then fine-tunes from it,
top stages first, for as long as the time budget allows (``transfer: probe``, see
:func:`lensforge.train.optim.apply_transfer`); if no fine-tuned epoch beats the probe on
validation, the probed model is the one kept.

The head is fitted with torch's L-BFGS rather than scikit-learn's ``LogisticRegression``
(which would fit the same model): the features are already torch tensors, the weights go
straight into the ``nn.Linear``, and the warm-started L2 path takes well under a second on
~1,500 x 1,280 features.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lensforge.train.loop import Batches, autocast

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 penalty on the head's weights (per image, standardised features)
LBFGS_STEPS = 60  # full-batch iterations per L2 value; the loss is convex, ~30 reach its optimum
FEATURE_BATCH = 64  # images per forward pass of the feature extraction
FEATURES_DIR = "probe"  # in the run folder: cached features, one safetensors file per key

_MEMORY_ENTRIES = 2  # feature sets kept in this process (a tuner's trials share one)
_memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`fit_probe` did; written to ``run.json`` under ``probe``."""

    val_acc: float
    train_acc: float
    l2: float
    num_features: int
    features_s: float  # extracting (or loading) the features
    fit_s: float  # fitting the head over the L2 grid
    cache: str  # where the features came from: "memory", "disk" or "computed"
    bf16: bool  # the forward pass ran under bf16 autocast

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def clear_feature_cache() -> None:
    """Forget the features kept in this process (the run folders' copies stay)."""
    _memory.clear()


def supports_probe(model: nn.Module) -> bool:
    """A linear probe needs timm's interface: pooled features and a single ``nn.Linear`` head."""
    return (all(hasattr(model, name) for name in ("forward_features", "forward_head", "get_classifier"))
            and isinstance(model.get_classifier(), nn.Linear))


def probe_bf16(device: torch.device, amp: bool) -> bool:
    """bf16 autocast for the feature pass: where training uses it, or on CPUs with AMX (measured
    1.5-1.8x faster there at equal probe accuracy; without AMX, bf16 convolutions are slower)."""
    if amp or device.type != "cpu":
        return amp
    from lensforge.utils.hardware import detect_cpu

    return detect_cpu().has("amx_bf16")


@torch.no_grad()
def extract_features(model: nn.Module, batches: Batches, bf16: bool) -> torch.Tensor:
    """Pooled pre-logit features (N, D) float32 of ``batches`` in order, without augmentation."""
    was_training = model.training
    model.eval()
    chunks = []
    for x, _ in batches.iterate():
        with autocast(batches.device, bf16):
            chunks.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
    model.train(was_training)
    return torch.cat(chunks)


def features_key(model: nn.Module, train: Batches, val: Batches, bf16: bool) -> str:
    """What decides the features: the images of both splits, their preprocessing, the backbone's weights."""
    digest = hashlib.sha256(json.dumps([train.table.preprocess.to_dict(), bf16, len(train), len(val)],
                                       sort_keys=True).encode())
    for batches in (train, val):
        digest.update(batches.images.numpy().tobytes())
    head = {id(p) for p in model.get_classifier().parameters()}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in head:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def cached_features(model: nn.Module, train: Batches, val: Batches, bf16: bool,
                    folder: Path | None) -> tuple[dict[str, torch.Tensor], str]:
    """Features of both splits from this process's cache, ``folder``, or one forward pass.

    Returns them and where they came from ("memory", "disk" or "computed"); either way they
    end up in both caches (``folder`` may be None: memory only).
    """
    key = features_key(model, train, val, bf16)
    path = folder / f"features-{key}.safetensors" if folder is not None else None
    found, where = _memory.get(key), "memory"
    if found is None:
        found, where = _read_features(path), "disk"
    if found is None:
        found = {"train": extract_features(model, train, bf16), "val": extract_features(model, val, bf16)}
        where = "computed"
    if path is not None and not path.exists():
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(found, tmp)
        tmp.replace(path)  # atomic: a killed write leaves no half file under the final name
    _memory[key] = found
    _memory.move_to_end(key)
    while len(_memory) > _MEMORY_ENTRIES:
        _memory.popitem(last=False)
    return found, where


def _read_features(path: Path | None) -> dict[str, torch.Tensor] | None:
    """Features saved by :func:`cached_features`, or None (no file, or a damaged one: computed again)."""
    if path is None or not path.exists():
        return None
    from safetensors.torch import load_file

    try:
        found = load_file(path)
    except (OSError, RuntimeError, ValueError):
        path.unlink(missing_ok=True)
        return None
    return found if set(found) == {"train", "val"} else None


def fit_linear_head(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                    num_classes: int, l2_grid: tuple[float, ...] = L2_GRID
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multinomial logistic regression on features: (weight (C, D), bias (C,), chosen L2).

    Features are standardised with the training statistics for the fit (well-conditioned
    L-BFGS), and the scaling is folded back into the returned weight and bias, so they act on
    raw features. The L2 strength with the lowest validation cross-entropy wins.
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    z_train, z_val = (train_x - mean) / std, (val_x - mean) / std
    weight, bias = torch.zeros(num_classes, train_x.shape[1]), torch.zeros(num_classes)
    best_loss, best = math.inf, (weight, bias, l2_grid[0])
    for l2 in sorted(l2_grid, reverse=True):  # strong to weak: each fit starts from the last (warm start)
        weight, bias = _lbfgs_fit(z_train, train_y, weight, bias, l2)
        with torch.no_grad():
            val_loss = float(F.cross_entropy(z_val @ weight.T + bias, val_y))
        if val_loss < best_loss:
            best_loss, best = val_loss, (weight, bias, l2)
    weight, bias, l2 = best
    raw_weight = weight / std
    return raw_weight, bias - raw_weight @ mean, l2


def _lbfgs_fit(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + l2/2 |W|^2 from (weight, bias) with full-batch L-BFGS."""
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_probe(model: nn.Module, train: Batches, val: Batches, *, bf16: bool,
              folder: Path | None = None) -> ProbeResult:
    """Fit ``model``'s classifier on frozen features of ``train``, choosing L2 on ``val``; in place.

    ``folder`` (the run's ``probe/``) keeps the features on disk for a resumed or repeated run.
    """
    started = time.perf_counter()
    features, where = cached_features(model, train, val, bf16, folder)
    features_s = time.perf_counter() - started
    head = model.get_classifier()
    weight, bias, l2 = fit_linear_head(features["train"], train.targets, features["val"], val.targets,
                                       head.out_features)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(((x @ weight.T + bias).argmax(1) == y).float().mean()) if len(y) else 0.0

    return ProbeResult(val_acc=accuracy(features["val"], val.targets),
                       train_acc=accuracy(features["train"], train.targets), l2=l2,
                       num_features=int(weight.shape[1]), features_s=features_s,
                       fit_s=time.perf_counter() - started - features_s, cache=where, bf16=bf16)
