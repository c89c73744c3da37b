"""``export_run(run)``: a finished run folder -> ``RUN/bundle`` (ONNX + manifest)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lensforge.errors import ArtifactError, UsageError


def _parity_images(run_dir: Path, pre, limit: int = 64) -> np.ndarray:
    """Real validation images of the run (its own split) for the parity check."""
    from lensforge.data.sources import open_source
    from lensforge.data.splits import load_splits
    from lensforge.data.table import load_table

    info = json.loads((run_dir / "run.json").read_text())
    table = load_table(open_source(info["data"]), pre, on_bad_image="skip")
    splits = load_splits(run_dir / "splits.json", table)
    pick = splits.val if len(splits.val) else splits.train
    return table.images[pick[:limit]]


def shipped_additions(bundle_dir: Path) -> list[str]:
    """What a bundle carries beyond a plain export (calibration, guardrails), in words; [] if nothing."""
    from lensforge.deploy.bundle import is_bundle, read_manifest

    if not is_bundle(bundle_dir):
        return []
    manifest = read_manifest(bundle_dir)
    found = []
    if manifest.get("temperature", 1.0) != 1.0 or "calibration" in manifest:
        found.append(f"calibration (temperature {manifest.get('temperature', 1.0):.3g})")
    guardrails = manifest.get("guardrails")
    if guardrails:
        detector = (guardrails.get("ood") or {}).get("detector") if isinstance(guardrails, dict) else None
        found.append(f"guardrails (OOD detector {detector})" if detector else "guardrails")
    return found


def export_run(run_dir: str | Path, *, atol: float = 1e-3, sample_images: np.ndarray | None = None,
               force: bool = False, show_progress: bool = False) -> Path:
    """Export the run's final model to ``RUN/bundle`` with a parity check on real images.

    A ``RUN/bundle`` that carries calibration or guardrails (as autopilot ships it) is not
    replaced unless ``force``: re-exporting would silently drop them.

    Raises:
        UsageError: the existing bundle carries calibration or guardrails and ``force`` is false.
    """
    from lensforge.deploy.export import write_bundle
    from lensforge.train.run import load_run

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ArtifactError(f"run '{run_dir}' does not exist")
    kept = shipped_additions(run_dir / "bundle")
    if kept and not force:
        raise UsageError(f"{run_dir / 'bundle'} carries {' and '.join(kept)} that re-exporting would drop; "
                         "pass --force to replace it (then run `lensforge calibrate` and `lensforge guard` again)")
    run = load_run(run_dir)
    images = sample_images if sample_images is not None else _parity_images(run_dir, run.preprocess)
    metrics = {}
    test_eval = run_dir / "eval" / "test.json"
    if test_eval.exists():
        saved = json.loads(test_eval.read_text())
        metrics = {"test": {k: saved[k] for k in ("accuracy", "macro_f1", "ece") if k in saved},
                   "evaluated": saved.get("evaluated")}
    return write_bundle(run.export_module(), run.preprocess, run.class_names, run_dir / "bundle",
                        model_name=run.info["model"], sample_images=images, task=run.info.get("task", "classification"),
                        metrics=metrics, extra={"run": run.info.get("name"), "data": run.info.get("data")}, atol=atol,
                        show_progress=show_progress)
