"""Crash-safe checkpoints: weights in safetensors, state in JSON, committed by rename.

A checkpoint is a folder ``checkpoints/epoch-0007/`` written under a temporary
name, fsynced, then renamed; ``checkpoints/latest.json`` (written atomically
after that) names it with the sha256 of each file. A run killed at any moment
therefore resumes from the last complete checkpoint, and a half-written folder
is never taken for a good one (it is not named by ``latest.json``, and a
damaged file fails its hash).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lensforge.errors import ArtifactError
from lensforge.utils.io import atomic_write_json, sha256_file, staging_dir

KEEP_CHECKPOINTS = 2  # the newest and one before it, in case the newest is damaged on disk


@dataclass
class Checkpoint:
    """What a checkpoint holds, in memory."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def set_rng_state(saved: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` under ``run_dir/checkpoints`` and point ``latest.json`` at it."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{ckpt.epoch:04d}"
    tmp = staging_dir(root / name)
    opt_tensors, opt_meta = _flatten_optimizer(ckpt.optimizer)
    save_file({k: v.detach().cpu().contiguous() for k, v in ckpt.model.items()}, tmp / "model.safetensors")
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    if ckpt.ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ckpt.ema.items()}, tmp / "ema.safetensors")
    state = {**ckpt.state, "epoch": ckpt.epoch, "optimizer_meta": opt_meta}
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    hashes = {f.name: sha256_file(f) for f in sorted(final.iterdir())}
    atomic_write_json(root / "latest.json", {"epoch": ckpt.epoch, "dir": name, "sha256": hashes})
    _prune(root, keep=name)
    return final


def _prune(root: Path, keep: str) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch-"))
    for old in done[:-KEEP_CHECKPOINTS]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".epoch-*.tmp-*"):  # temporary folders of a killed write
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest.json"
    return pointer if pointer.exists() else None


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Load the checkpoint named by ``latest.json``, verifying every file's sha256."""
    pointer = latest_checkpoint(run_dir)
    if pointer is None:
        raise ArtifactError(f"run '{run_dir}' has no checkpoint to resume from")
    try:
        meta = json.loads(pointer.read_text())
        folder = pointer.parent / meta["dir"]
        for name, digest in meta["sha256"].items():
            if sha256_file(folder / name) != digest:
                raise ArtifactError(f"checkpoint '{folder / name}' is damaged (sha256 mismatch)")
        state = json.loads((folder / "state.json").read_text())
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ArtifactError(f"checkpoint of run '{run_dir}' cannot be read: {e}") from None
    ema_path = folder / "ema.safetensors"
    optimizer = _unflatten_optimizer(load_file(folder / "optimizer.safetensors"), state.pop("optimizer_meta"))
    return Checkpoint(epoch=int(state["epoch"]), model=load_file(folder / "model.safetensors"),
                      optimizer=optimizer, state=state,
                      ema=load_file(ema_path) if ema_path.exists() else None)
