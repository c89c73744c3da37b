"""``stress(target)``: accuracy under corruptions and shifts, measured on the artifact that ships.

Each (corruption, severity) of the chosen suite is applied once to the evaluation
images, at the model's input size; the target (a bundle through ONNX Runtime, or a
run through PyTorch), an optional reference (for mCE) and any comparison bundles
(e.g. the int8 variant) all classify the *same* corrupted pixels, so their
differences are the models', not the draws'.

Metrics follow Hendrycks & Dietterich (ICLR 2019): error E(c, s) per corruption c and
severity s; corruption error CE_c = sum_s E_f(c, s) / sum_s E_ref(c, s) and its mean mCE;
relative CE_c = sum_s (E_f(c, s) - E_f(clean)) / sum_s (E_ref(c, s) - E_ref(clean)) and
its mean. Without a reference the mean corruption error (mean of E over the suite) is
reported. Prediction stability is the share of predictions that flip under 1-2 pixel
shifts and mild photometric jitter (Azulay & Weiss 2019; Hendrycks' ImageNet-P idea).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lensforge.errors import UsageError
from lensforge.evaluate.runner import Target, open_target, predict_table, split_of
from lensforge.utils.io import atomic_write_json
from lensforge.utils.progress import StepProgress

SHIFTS_PX = ((1, 0), (-1, 0), (0, 1), (0, -1), (2, 0), (0, 2), (-2, 0), (0, -2))
JITTERS = 4  # photometric jitter draws per image: +-6% brightness/contrast, noise std 2/255


class StressConfig(BaseModel):
    """What to run and on which images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    suite: str = "quick"  # "quick" or "full" (see lensforge.ops.corruptions.SUITES)
    split: str = "test"
    max_images: int | None = Field(None, ge=10)  # a seeded subset keeps the full suite quick on big sets
    stability: bool = True
    seed: int = 0
    batch_size: int = Field(256, ge=1)


@dataclass
class _Model:
    """One model under test: how it predicts and its targets (in its own class order)."""

    name: str
    target: Target
    targets: np.ndarray
    precision: str
    predictions: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class StressResult:
    summary: dict[str, Any]
    path: Path | None


def _precision(path: Path) -> str:
    from lensforge.artifacts import resolve_artifact
    from lensforge.deploy.bundle import read_manifest

    return str(read_manifest(path).get("precision", "fp32")) if resolve_artifact(path).is_bundle else "fp32 (PyTorch)"


def _open_models(main: Target, main_path: Path, others: dict[str, list[Path]], main_targets: np.ndarray,
                 batch_size: int) -> list[_Model]:
    models = [_Model("target", main, main_targets, _precision(main_path))]
    for role, paths in others.items():
        for path in paths:
            other = open_target(Path(path), batch_size)
            if (other.preprocess.channels, *other.preprocess.input_size) != (
                    main.preprocess.channels, *main.preprocess.input_size):
                raise UsageError(f"{path}: expects {other.preprocess.channels}x"
                                 f"{'x'.join(map(str, other.preprocess.input_size))} images but the target "
                                 f"{main.preprocess.channels}x{'x'.join(map(str, main.preprocess.input_size))}; "
                                 "stress models of the same input size together")
            if sorted(other.class_names) != sorted(main.class_names):
                raise UsageError(f"{path}: its classes {other.class_names[:6]} differ from the target's "
                                 f"{main.class_names[:6]}")
            mapping = np.array([other.class_names.index(name) for name in main.class_names])
            models.append(_Model(f"{role}:{path}", other, mapping[main_targets], _precision(Path(path))))
    return models


def _auto_compare(main_path: Path, target: Target) -> list[Path]:
    """The int8 variants of the target's run, when the target is the run's fp32 bundle or the run."""
    from lensforge.deploy.bundle import read_manifest

    if target.run_dir is None or (main_path.resolve() not in (target.run_dir.resolve(),
                                                              (target.run_dir / "bundle").resolve())):
        return []
    found = []
    for bundle in sorted((target.run_dir / "variants").glob("*/bundle")):
        try:
            if read_manifest(bundle).get("precision") == "int8":
                found.append(bundle)
        except Exception:  # a damaged variant is compress's business, not the suite's
            continue
    return found


def _predict_all(models: list[_Model], key: str, images: np.ndarray, batch_size: int) -> None:
    for model in models:
        model.predictions[key] = predict_table(model.target.predict, images, batch_size).argmax(1)


def _accuracy(model: _Model, key: str) -> float:
    return float((model.predictions[key] == model.targets).mean())


def _shift(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Translate by whole pixels, repeating the edge (no wrap-around content)."""
    h, w = images.shape[2:]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return images[:, :, rows][:, :, :, cols]


def _jitter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(images)
    gain = rng.uniform(0.94, 1.06, (n, 1, 1, 1))
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    contrast = rng.uniform(0.94, 1.06, (n, 1, 1, 1))
    noise = rng.normal(0.0, 2.0, images.shape)
    out = ((images.astype(np.float64) - mean) * contrast + mean) * gain + noise
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _stability(models: list[_Model], images: np.ndarray, batch_size: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed + 7919)
    variants: dict[str, np.ndarray] = {f"shift_{dx}_{dy}": _shift(images, dx, dy) for dx, dy in SHIFTS_PX}
    variants.update({f"jitter_{i}": _jitter(images, rng) for i in range(JITTERS)})
    for key, batch in variants.items():
        _predict_all(models, key, batch, batch_size)
    out = {}
    for model in models:
        clean = model.predictions["clean"]
        shift = [float((model.predictions[k] != clean).mean()) for k in variants if k.startswith("shift")]
        jitter = [float((model.predictions[k] != clean).mean()) for k in variants if k.startswith("jitter")]
        out[model.name] = {"translate_flip_rate": float(np.mean(shift)), "jitter_flip_rate": float(np.mean(jitter)),
                           "shifts_px": [list(s) for s in SHIFTS_PX], "jitter_draws": JITTERS}
    return out


def _corruption_table(model: _Model, plan: list[tuple[str, int]]) -> dict[str, dict[str, Any]]:
    from lensforge.ops.corruptions import CORRUPTIONS

    table: dict[str, dict[str, Any]] = {}
    for name, severity in plan:
        entry = table.setdefault(name, {"family": CORRUPTIONS.get(name).family, "accuracy": {}})
        entry["accuracy"][str(severity)] = _accuracy(model, f"{name}@{severity}")
    for entry in table.values():
        entry["error_mean"] = 1.0 - float(np.mean(list(entry["accuracy"].values())))
    return table


def corruption_errors(model: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """CE, relative CE per corruption and their means, from two per-corruption accuracy tables."""
    per: dict[str, dict[str, float | None]] = {}
    for name, entry in model["corruptions"].items():
        ref = reference["corruptions"][name]["accuracy"]
        errors = np.array([1 - a for a in entry["accuracy"].values()])
        ref_errors = np.array([1 - ref[s] for s in entry["accuracy"]])
        ce = float(errors.sum() / ref_errors.sum()) if ref_errors.sum() > 1e-9 else None
        rel_denominator = (ref_errors - (1 - reference["clean_accuracy"])).sum()
        rel = (float((errors - (1 - model["clean_accuracy"])).sum() / rel_denominator)
               if rel_denominator > 1e-9 else None)
        per[name] = {"ce": ce, "relative_ce": rel}
    ces = [p["ce"] for p in per.values() if p["ce"] is not None]
    rels = [p["relative_ce"] for p in per.values() if p["relative_ce"] is not None]
    return {"per_corruption": per, "mce": float(np.mean(ces)) if ces else None,
            "relative_mce": float(np.mean(rels)) if rels else None}


def _model_summary(model: _Model, plan: list[tuple[str, int]], path: str) -> dict[str, Any]:
    corruptions = _corruption_table(model, plan)
    families: dict[str, list[float]] = {}
    for entry in corruptions.values():
        families.setdefault(entry["family"], []).extend(entry["accuracy"].values())
    errors = [1 - a for entry in corruptions.values() for a in entry["accuracy"].values()]
    return {"target": path, "precision": model.precision, "clean_accuracy": _accuracy(model, "clean"),
            "corruptions": corruptions, "mean_corruption_error": float(np.mean(errors)),
            "family_accuracy": {f: float(np.mean(a)) for f, a in families.items()}}


def _gap(main: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Accuracy points the other model loses vs the target, per corruption (mean over severities)."""
    per = {name: 100 * float(np.mean([entry["accuracy"][s] - other["corruptions"][name]["accuracy"][s]
                                      for s in entry["accuracy"]]))
           for name, entry in main["corruptions"].items()}
    return {"clean_points": 100 * (main["clean_accuracy"] - other["clean_accuracy"]),
            "per_corruption_points": per, "mean_points": float(np.mean(list(per.values()))),
            "worst": max(per, key=per.get) if per else None}


def _corrupt_numpy(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    import torch

    from lensforge.ops.corruptions import corrupt

    return corrupt(torch.from_numpy(images), name, severity, seed=seed).numpy()


def _run_plan(models: list[_Model], images: np.ndarray, plan: list[tuple[str, int]], cfg: StressConfig,
              advance: Callable[[str], None]) -> None:
    for name, severity in plan:
        corrupted = _corrupt_numpy(images, name, severity, cfg.seed)
        _predict_all(models, f"{name}@{severity}", corrupted, cfg.batch_size)
        advance(f"{name} s{severity}")


def stress(target: str | Path, data: str | None = None, *, cfg: StressConfig | None = None,
           reference: str | Path | None = None, compare: list[str | Path] | None = None,
           json_out: str | Path | None = None, write: bool = True, show_progress: bool = True,
           run_dir: str | Path | None = None) -> StressResult:
    """Run the corruption suite (and stability) on a bundle or run; compare to a reference and int8 variants.

    The artifact's task decides what is measured: a classifier's accuracy (below,
    :func:`stress_classifier`), a detector's mAP (:mod:`lensforge.stress.detection`).
    ``compare`` defaults to the int8 variants of the target's run (``RUN/variants/*/bundle``);
    pass ``[]`` for none. The summary goes to ``RUN/stress/corruptions.json`` when the target
    belongs to a run, and to ``json_out`` when given. ``run_dir`` names the run of a bundle
    kept outside it (a shipped variant): its data and test split are used.
    """
    from lensforge.artifacts import resolve_artifact
    from lensforge.tasks import get_task

    artifact = resolve_artifact(target, run_dir=run_dir)
    return get_task(artifact.task).torch().stress(
        artifact, data, cfg=cfg or StressConfig(), reference=reference, compare=compare, json_out=json_out,
        write=write, show_progress=show_progress)


def stress_classifier(artifact: Any, data: str | None = None, *, cfg: StressConfig,
                      reference: str | Path | None = None, compare: list[str | Path] | None = None,
                      json_out: str | Path | None = None, write: bool = True,
                      show_progress: bool = True) -> StressResult:
    """A classifier's accuracy under the suite (see :func:`stress`)."""
    from lensforge.ops.corruptions import suite_plan

    plan = suite_plan(cfg.suite)
    path = artifact.path
    main = open_target(path, cfg.batch_size, run_dir=artifact.run_dir)
    data_spec, table, indices, targets = split_of(main, data, cfg.split, seed=cfg.seed)
    if cfg.max_images and len(indices) > cfg.max_images:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(indices))[:cfg.max_images])
        indices, targets = indices[keep], targets[keep]
    images = table.images[indices]
    compare_paths = _auto_compare(path, main) if compare is None else [Path(p) for p in compare]
    others = {"reference": [Path(reference)] if reference else [], "compare": compare_paths}
    models = _open_models(main, path, others, targets, cfg.batch_size)
    _predict_all(models, "clean", images, cfg.batch_size)
    with StepProgress("stress", len(plan), enabled=show_progress) as advance:
        _run_plan(models, images, plan, cfg, advance)
    summary = _summary(models, plan, cfg, path, data_spec, len(images))
    if cfg.stability:
        summary["stability"] = _stability(models, images, cfg.batch_size, cfg.seed)
    out = _write(summary, main, json_out, write)
    return StressResult(summary, out)


def _summary(models: list[_Model], plan: list[tuple[str, int]], cfg: StressConfig, path: Path, data_spec: str,
             num_images: int) -> dict[str, Any]:
    main = _model_summary(models[0], plan, str(path))
    summary: dict[str, Any] = {"kind": models[0].target.kind, "data": data_spec, "split": cfg.split,
                               "suite": cfg.suite, "seed": cfg.seed, "num_images": num_images,
                               "severities": sorted({s for _, s in plan}), **main}
    reference = [m for m in models if m.name.startswith("reference:")]
    if reference:
        ref = _model_summary(reference[0], plan, reference[0].name.split(":", 1)[1])
        summary["reference"] = ref
        summary.update(corruption_errors(main, ref))
    summary["compare"] = []
    for model in (m for m in models if m.name.startswith("compare:")):
        other = _model_summary(model, plan, model.name.split(":", 1)[1])
        summary["compare"].append({**other, "gap": _gap(main, other)})
    return summary


def _write(summary: dict[str, Any], main: Target, json_out: str | Path | None, write: bool) -> Path | None:
    out = None
    if write and main.run_dir is not None:
        out = atomic_write_json(main.run_dir / "stress" / "corruptions.json", summary)
    if json_out is not None:
        out = atomic_write_json(json_out, summary)
    return out
