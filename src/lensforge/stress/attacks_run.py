"""``adversarial(target)``: robust-accuracy curves of a run, and how they carry over to its bundle.

White-box attacks need gradients, so they run on the PyTorch model of the run (for a
bundle: the run it was exported from). When the target is a bundle, the adversarial
images of each L-inf attack are also quantised to 8 bits and sent to the bundle
through ONNX Runtime, so the report shows what the shipped artifact does with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.errors import UsageError
from lensforge.utils.io import atomic_write_json

DEFAULT_MAX_IMAGES = 500  # attacks cost ~steps x restarts forward-backward passes per image and epsilon
DEFAULT_ATTACKS = ("fgsm", "pgd-linf", "apgd-ce")  # one single-step, one iterative, one parameter-free (Croce & Hein)
DEFAULT_EPSILONS = (0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)  # L-inf, share of the pixel range; 8/255 is the CIFAR norm
DEFAULT_STEPS = 10  # PGD / APGD iterations
DEFAULT_RESTARTS = 1


def _run_of(path: Path) -> tuple[Path, Path | None]:
    """(run folder, bundle or None) for a run folder or a bundle inside one."""
    from lensforge.artifacts import resolve_artifact

    artifact = resolve_artifact(path)
    if artifact.run_dir is None:
        raise UsageError(f"'{path}': white-box attacks need the model's gradients; the bundle is not inside a "
                         "run folder, so pass the run it was exported from")
    return artifact.run_dir, path if artifact.is_bundle else None


def _transfer(run: Any, bundle_path: Path, images: np.ndarray, targets: np.ndarray, curve: dict[str, Any],
              *, steps: int, restarts: int, seed: int) -> dict[str, Any]:
    from lensforge.deploy.bundle import load_bundle
    from lensforge.ops.attacks import adversarial_examples, transfer_accuracy

    bundle = load_bundle(bundle_path)
    out: dict[str, Any] = {}
    for name, entry in curve["attacks"].items():
        if entry["norm"] != "linf":
            continue
        row: dict[str, list[float]] = {"epsilons": [], "torch": [], "bundle": []}
        for eps, torch_acc in zip(entry["epsilons"], entry["robust_accuracy"]):
            if eps == 0:
                continue
            adv = adversarial_examples(run.model, images, targets, run.preprocess, name, eps, steps=steps,
                                       restarts=restarts, seed=seed)
            moved = transfer_accuracy(adv, targets, lambda x: bundle.predict_uint8(x)[0])
            row["epsilons"].append(eps)
            row["torch"].append(torch_acc)
            row["bundle"].append(moved["transfer_accuracy"])
        out[name] = row
    return out


def adversarial(target: str | Path, data: str | None = None, *, split: str = "test",
                attacks: Sequence[str] = DEFAULT_ATTACKS, epsilons: Sequence[float] = DEFAULT_EPSILONS,
                steps: int = DEFAULT_STEPS, restarts: int = DEFAULT_RESTARTS,
                max_images: int | None = DEFAULT_MAX_IMAGES, seed: int = 0,
                json_out: str | Path | None = None, write: bool = True) -> dict[str, Any]:
    """Robust accuracy against epsilon per attack, masking warnings, and the bundle's transfer accuracy."""
    from lensforge.evaluate.runner import open_target, split_of
    from lensforge.ops.attacks import robust_accuracy_curve
    from lensforge.train.run import load_run

    for eps in epsilons:
        if not 0 <= eps <= 1:
            raise UsageError(f"epsilon must be in [0, 1] (a share of the pixel range), not {eps}")
    run_dir, bundle_path = _run_of(Path(target))
    opened = open_target(run_dir)
    data_spec, table, indices, targets = split_of(opened, data, split, seed=seed)
    if max_images and len(indices) > max_images:
        keep = np.sort(np.random.default_rng(seed).permutation(len(indices))[:max_images])
        indices, targets = indices[keep], targets[keep]
    images = table.images[indices]
    run = load_run(run_dir)
    curve = robust_accuracy_curve(run.model, images, targets, run.preprocess, attacks=attacks, epsilons=epsilons,
                                  steps=steps, restarts=restarts, seed=seed)
    curve.update({"run": str(run_dir), "data": data_spec, "split": split})
    if bundle_path is not None:
        curve["bundle"] = str(bundle_path)
        curve["transfer"] = _transfer(run, bundle_path, images, targets, curve, steps=steps, restarts=restarts,
                                      seed=seed)
    if write:
        atomic_write_json(run_dir / "stress" / "adversarial.json", curve)
    if json_out is not None:
        atomic_write_json(json_out, curve)
    return curve
