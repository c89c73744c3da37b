"""``compress(run, cfg)``: pruned, distilled and quantized variants, each guarded on its artifact.

Every variant is written to ``RUN/variants/<name>/`` with its own bundle, evaluated on
the run's test split *through its ONNX file* and timed side by side with its parent.
A variant that loses more than ``max_drop`` points, or is not faster than its parent,
is kept on disk but marked rejected, with the reason and the numbers
(``variant.json`` and ``RUN/variants/variants.json``).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lensforge.compress.measure import TestSet, interleaved_latency, load_test_set
from lensforge.defaults import MAX_DROP_POINTS
from lensforge.errors import ChanceLevelError, UsageError
from lensforge.evaluate.metrics import chance_message
from lensforge.utils.io import atomic_write_json

# A variant must be clearly faster than its parent, or it only adds risk; sub-millisecond
# timings on a loaded 2-core machine swing by several percent, hence the 5% margin.
MIN_SPEEDUP = 1.05
# Speed-ups this close to the margin are timed again, longer and pair-wise, before a verdict.
RETIME_BAND = (0.9, 1.2)
RETIME_ROUNDS = 15


class CompressConfig(BaseModel):
    """What variants to make and how strictly to guard them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prune: float | None = Field(None, gt=0, lt=1)  # channel ratio removed per layer
    prune_steps: int = Field(1, ge=1, le=20)  # iterative schedule: prune a bit, fine-tune, repeat
    # keep channel counts multiples of this: ONNX Runtime's and OpenVINO's kernels run odd widths slowly
    round_to: int | None = Field(None, ge=1, le=256)
    distill: bool = False  # fine-tune pruned models against the unpruned one (or `teacher`)
    teacher: str | None = None  # run or bundle to distil from instead of the unpruned run
    quantize: tuple[Literal["int8", "fp16"], ...] = ()
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_images: int = Field(256, ge=8, le=100_000)
    max_drop: float = Field(MAX_DROP_POINTS, ge=0, le=100)  # accuracy points a variant may lose vs its parent
    allow_chance_parent: bool = False  # compress a parent that scores at chance level (--force)
    finetune_epochs: int = Field(5, ge=1, le=1000)
    threads: int | None = Field(None, ge=1, le=512)


@dataclass
class Variant:
    """One compressed artifact and its verdict."""

    name: str
    kind: str  # "baseline", "pruned", "int8", "fp16", ...
    parent: str | None
    bundle: str
    metrics: dict[str, Any]
    latency_ms: dict[str, float]
    size_mb: float
    params: int | None = None
    macs: int | None = None
    speedup: float | None = None
    drop_points: float | None = None
    status: str = "accepted"
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompressResult:
    run_dir: Path
    variants: list[Variant]

    def accepted(self) -> list[Variant]:
        return [v for v in self.variants if v.status == "accepted"]


def _size_mb(bundle: Path) -> float:
    return (bundle / "model.onnx").stat().st_size / 1e6


def _baseline(run_dir: Path, test: TestSet) -> Variant:
    from lensforge.deploy.bundle import is_bundle
    from lensforge.deploy.from_run import export_run

    bundle = run_dir / "bundle"
    if not is_bundle(bundle):
        export_run(run_dir)
    return Variant("baseline", "baseline", None, str(bundle), test.metrics(bundle), {}, _size_mb(bundle),
                   reason="the exported fp32 model")


def _prune_variant(run_dir: Path, cfg: CompressConfig, console: Any) -> tuple[str, Path, dict[str, Any]]:
    """Prune the run's model, fine-tune it (optionally distilling), export its bundle."""
    import torch

    from lensforge.models.prune import prune_model
    from lensforge.train import load_run, resolve_config, train

    run = load_run(run_dir)
    pre = run.preprocess
    name = f"pruned-{int(round(cfg.prune * 100))}" + ("-kd" if cfg.distill else "")
    out = run_dir / "variants" / name
    shutil.rmtree(out, ignore_errors=True)
    model = copy.deepcopy(run.model)
    report = prune_model(model, torch.zeros(1, pre.channels, *pre.input_size), ratio=cfg.prune,
                         iterative_steps=cfg.prune_steps, round_to=cfg.round_to)
    console.print(f"pruned {cfg.prune:.0%} of channels: params {report.params_before:,} -> {report.params_after:,}, "
                  f"MACs {report.macs_reduction:.2f}x fewer; fine-tuning {cfg.finetune_epochs} epochs")
    teacher = cfg.teacher or (str(run_dir) if cfg.distill else None)
    base = resolve_config(run_dir / "config.yaml")
    ft = resolve_config(None, **{**base.model_dump(), "out": str(out), "epochs": cfg.finetune_epochs,
                                 "lr": (run.info.get("resolved", {}).get("lr") or 2e-3) * 0.5, "warmup_epochs": 0,
                                 "splits_file": str(run_dir / "splits.json"), "teacher": teacher,
                                 "early_stopping": 0, "pretrained": None})
    train(ft, init_model=model, structure=[report.structure], console=console, show_progress=False)
    from lensforge.deploy.from_run import export_run

    details = {"params_before": report.params_before, "params_after": report.params_after,
               "macs_before": report.macs_before, "macs_after": report.macs_after,
               "macs_reduction": report.macs_reduction, "teacher": teacher, "structure": report.structure}
    return name, export_run(out), details


def _calibration(run_dir: Path, n: int, seed: int = 0) -> np.ndarray:
    train_images = load_test_set(run_dir, split="train").images
    pick = np.random.default_rng(seed).permutation(len(train_images))[:n]
    return train_images[np.sort(pick)]


def _quantized(parent: Variant, kind: str, run_dir: Path, cfg: CompressConfig, test: TestSet,
               calibration: np.ndarray) -> tuple[str, Path, dict[str, Any]]:
    from lensforge.compress.quantize import convert_fp16, quantize_guarded

    name = f"{parent.name}-{kind}" if parent.kind != "baseline" else kind
    out = run_dir / "variants" / name / "bundle"
    if kind == "fp16":
        return name, convert_fp16(parent.bundle, out, sample_images=calibration[:32]), {}
    result = quantize_guarded(parent.bundle, out, calibration, test.accuracy, max_drop_points=cfg.max_drop,
                              reference_accuracy=parent.metrics["accuracy"], method=cfg.calibration_method)
    if result.bundle is None:
        raise UsageError(f"INT8 quantization of {parent.name} failed: {result.reason}")
    return name, result.bundle, {"attempts": result.attempts, "quantize_reason": result.reason}


def _retime_if_close(variant: Variant, parent: Variant, cfg: CompressConfig) -> None:
    """Time ``variant`` against its parent again, longer, when the first verdict was a near call.

    The first pass times all bundles in one round-robin; a speed-up near MIN_SPEEDUP can flip
    on a noisy machine, so the pair gets a second, longer interleaved measurement and the
    variant keeps that one (its parent's figures stay those of the shared pass).
    """
    speedup = parent.latency_ms["p50"] / variant.latency_ms["p50"]
    if not RETIME_BAND[0] <= speedup <= RETIME_BAND[1]:
        return
    parent_again, variant_again = interleaved_latency([Path(parent.bundle), Path(variant.bundle)],
                                                      rounds=RETIME_ROUNDS, threads=cfg.threads)
    scale = parent.latency_ms["p50"] / parent_again["p50"]  # express it on the shared pass's scale
    variant.latency_ms = {key: value * scale if key != "batch" else value for key, value in variant_again.items()}
    variant.details["retimed"] = {"first_speedup": round(speedup, 3),
                                  "pair_speedup": round(parent_again["p50"] / variant_again["p50"], 3)}


def _guard(variant: Variant, parent: Variant, cfg: CompressConfig) -> None:
    """Accept or reject ``variant`` against its parent, with the numbers in the reason."""
    # rounded so that float noise (0.96 - 0.95 = 0.0100000000000009) does not decide a verdict
    variant.drop_points = round((parent.metrics["accuracy"] - variant.metrics["accuracy"]) * 100, 6)
    variant.speedup = parent.latency_ms["p50"] / variant.latency_ms["p50"]
    problems = []
    if variant.drop_points > cfg.max_drop:
        problems.append(f"accuracy drop {variant.drop_points:.2f} points > allowed {cfg.max_drop:g}")
    if variant.speedup < MIN_SPEEDUP:
        problems.append(f"not clearly faster than {parent.name} ({variant.latency_ms['p50']:.2f} ms vs "
                        f"{parent.latency_ms['p50']:.2f} ms at batch 1, {variant.speedup:.2f}x)")
    variant.status = "rejected" if problems else "accepted"
    variant.reason = "; ".join(problems) or (
        f"{variant.speedup:.2f}x faster than {parent.name}, accuracy change {-variant.drop_points:+.2f} points")


def _make_variants(run_dir: Path, cfg: CompressConfig, test: TestSet, baseline: Variant,
                   console: Any) -> list[Variant]:
    made = [baseline]
    if cfg.prune:
        name, bundle, details = _prune_variant(run_dir, cfg, console)
        made.append(Variant(name, "pruned", "baseline", str(bundle), test.metrics(bundle), {}, _size_mb(bundle),
                            params=details["params_after"], macs=details["macs_after"], details=details))
    if cfg.quantize:
        calibration = _calibration(run_dir, cfg.calibration_images)
        for parent in list(made):
            for kind in cfg.quantize:
                console.print(f"{kind} quantization of {parent.name} ...")
                name, bundle, details = _quantized(parent, kind, run_dir, cfg, test, calibration)
                made.append(Variant(name, kind, parent.name, str(bundle), test.metrics(bundle), {},
                                    _size_mb(bundle), params=parent.params, macs=parent.macs, details=details))
    return made


def refuse_chance_parent(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Raise :class:`ChanceLevelError` when the run's bundle scores at chance level on its test split.

    Compressing such a model only produces faster nonsense that every guard would accept
    (nothing to lose); the caller overrides with ``allow_chance_parent`` (``--force``).
    """
    if metrics.get("at_chance"):
        raise ChanceLevelError(f"run '{run_dir}': " + chance_message(metrics, "its bundle")
                               + "; retrain it, or pass --force to compress it anyway")


def compress(run_dir: str | Path, cfg: CompressConfig, *, console: Any = None) -> CompressResult:
    """Make the variants ``cfg`` asks for, measure each on its artifact, and guard it.

    Raises:
        ChanceLevelError: the parent scores at chance level (unless ``cfg.allow_chance_parent``).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise UsageError(f"'{run_dir}' is not a run folder (no run.json)")
    if not cfg.prune and not cfg.quantize:
        raise UsageError("nothing to do: pass --prune RATIO and/or --quantize int8|fp16")
    if cfg.distill and not cfg.prune:
        raise UsageError("--distill fine-tunes a pruned model: pass --prune RATIO too "
                         "(or train a small model with `lensforge train --teacher RUN`)")
    test = load_test_set(run_dir)
    baseline = _baseline(run_dir, test)
    if not cfg.allow_chance_parent:
        refuse_chance_parent(run_dir, baseline.metrics)
    variants = _make_variants(run_dir, cfg, test, baseline, console)
    console.print(f"timing {len(variants)} bundles side by side (ONNX Runtime, batch 1) ...")
    for variant, latency in zip(variants, interleaved_latency([Path(v.bundle) for v in variants],
                                                              threads=cfg.threads)):
        variant.latency_ms = latency
    by_name = {v.name: v for v in variants}
    for variant in variants[1:]:
        _retime_if_close(variant, by_name[variant.parent], cfg)
        _guard(variant, by_name[variant.parent], cfg)
    for variant in variants[1:]:  # the baseline is the run's own bundle
        atomic_write_json(Path(variant.bundle).parent / "variant.json", asdict(variant))
    atomic_write_json(run_dir / "variants" / "variants.json",
                      {"config": cfg.model_dump(mode="json"), "variants": [asdict(v) for v in variants]})
    return CompressResult(run_dir, variants)
