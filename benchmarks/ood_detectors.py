"""OOD detectors on a digits model: AUROC and FPR95 per detector and OOD set, and the gain over MSP.

Issue aim ("guardrails"): the best feature-based detector (Mahalanobis, ViM or KNN) at least
+2 points of mean AUROC above the maximum-softmax baseline (MSP).

1. train a model on ``builtin:digits`` with lensforge's default recipe (``tinycnn_s`` at 16 px,
   grayscale; cached in ``--workdir``), or take ``--run``; export it (``RUN/bundle``);
2. copy the bundle and ``fit_guardrails`` it: every detector is fitted with pytorch-ood on the
   training split's ONNX features, the shipped one is chosen by mean AUROC on the validation split;
3. score the *test* split (never used for a choice) against the OOD sets with the NumPy scorers
   that ship: builtin:shapes, uniform and Gaussian noise, textures, and severity-5 corruptions
   of test digits; 512 images per set.

Also a KNN ``k`` sweep on the validation split (the default ``k`` was set from it).

    .venv/bin/python benchmarks/ood_detectors.py            # ~2-3 min with training, ~30 s reusing the run
    .venv/bin/python benchmarks/ood_detectors.py --run runs/digits --json /tmp/ood.json
"""

from __future__ import annotations

import _common  # first: sets OMP_WAIT_POLICY before torch loads  # isort: skip

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.stress.ood import DEFAULT_OOD_SETS, DetectorOptions, evaluate_ood, fit_guardrails

AIM_GAIN = 2.0  # AUROC points, best feature-based detector over MSP
FEATURE_BASED = ("mahalanobis", "vim", "knn")
DEFAULT_RECIPE = _common.Recipe({"data": "builtin:digits", "seed": 0})  # every other option: the defaults


def prepare_run(args: argparse.Namespace) -> Path:
    from lensforge.deploy.bundle import is_bundle
    from lensforge.deploy.from_run import export_run

    if args.run is not None:
        run_dir = args.run
    else:
        trained = _common.trained_run(DEFAULT_RECIPE, args.workdir)
        run_dir = trained.path
        how = "reused" if trained.reused else f"trained in {trained.train_s:.0f} s"
        print(f"run {run_dir} ({how}, {trained.epochs} epochs, best val acc {trained.best_val_acc:.2%})")
    if not is_bundle(run_dir / "bundle"):
        export_run(run_dir)
    return run_dir


def print_table(title: str, table: dict[str, dict[str, Any]], sets: list[str]) -> None:
    print(f"\n{title}")
    header = f"{'detector':<12}" + "".join(f"{name:>16}" for name in sets) + f"{'mean':>16}"
    print(header + "\n" + "-" * len(header))
    for name, row in table.items():
        cells = "".join(f"{row['auroc'][s]:>9.4f}/{row['fpr95'][s]:<6.3f}" for s in sets)
        print(f"{name:<12}{cells}{row['mean_auroc']:>9.4f}/{row['mean_fpr95']:<6.3f}")
    print("cells: AUROC/FPR95 (share of OOD images accepted at 95% in-distribution kept)")


def knn_sweep(bundle: Path, run_dir: Path, ks: list[int], n_ood: int) -> dict[int, float]:
    means = {}
    for k in ks:
        evaluation = evaluate_ood(bundle, run_dir=run_dir, detectors=["knn"], n_ood=n_ood,
                                  options=DetectorOptions(knn_k=k))
        means[k] = evaluation.mean_auroc("knn")
    return means


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = _common.machine()
    _common.print_header("OOD detectors on builtin:digits", info)
    run_dir = prepare_run(args)
    work = Path(tempfile.mkdtemp(prefix="ood-bench-"))
    bundle = Path(shutil.copytree(run_dir / "bundle", work / "bundle"))  # the run's own bundle stays as it was
    started = time.perf_counter()
    report = fit_guardrails(bundle, run_dir=run_dir, n_ood=args.n_ood, write=False)
    fit_s = time.perf_counter() - started
    sets = list(DEFAULT_OOD_SETS)
    print_table(f"validation split ({report['in_distribution']['val']} images; chooses the detector)",
                report["detectors"], sets)
    test = evaluate_ood(bundle, run_dir=run_dir, split="test", n_ood=args.n_ood, seed=1)
    test_table = test.table()
    print_table("test split (never used for a choice), fresh OOD draws", test_table, sets)
    best = max(FEATURE_BASED, key=lambda name: test_table[name]["mean_auroc"] if name in test_table else -1)
    gain = 100 * (test_table[best]["mean_auroc"] - test_table["msp"]["mean_auroc"])
    chosen_gain = 100 * (test_table[report["chosen"]]["mean_auroc"] - test_table["msp"]["mean_auroc"])
    verdict = "meets" if chosen_gain >= AIM_GAIN else "MISSES"
    print(f"\nshipped detector (chosen on val): {report['chosen']}, threshold {report['threshold']:.4g}; "
          f"fit_guardrails took {fit_s:.1f} s")
    print(f"test mean AUROC gain over MSP: shipped {report['chosen']} {chosen_gain:+.2f} points, best feature-based "
          f"{best} {gain:+.2f} points ({verdict} the +{AIM_GAIN:.0f}-point aim)")
    abstain = report["abstain"]
    print(f"abstain: threshold {abstain['threshold']:.4f} (target risk {abstain['target_risk']:.2%}); val coverage "
          f"{abstain['validation']['coverage']:.2%}, risk {abstain['validation']['risk']:.2%} "
          f"(error {abstain['validation']['error']:.2%}); AURC {report['selective']['aurc']:.5f}")
    sweep = knn_sweep(bundle, run_dir, args.knn_ks, args.n_ood)
    print("knn k sweep (val mean AUROC): " + ", ".join(f"k={k}: {v:.4f}" for k, v in sweep.items()))
    result = {"machine": info, "run": str(run_dir), "n_ood": args.n_ood, "fit_s": fit_s, "validation": report,
              "test": test_table, "gain_points": {"shipped": chosen_gain, "best_feature_based": gain, "best": best},
              "knn_sweep": sweep}
    _common.write_json(args.json, result)
    shutil.rmtree(work, ignore_errors=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an existing digits run folder (default: train one, cached)")
    parser.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR, help="trained runs, reused")
    parser.add_argument("--n-ood", type=int, default=512, help="images per OOD set")
    parser.add_argument("--knn-ks", type=lambda text: [int(k) for k in text.split(",")], default=[1, 5, 10, 20, 50],
                        help="k values of the KNN sweep, comma-separated")
    parser.add_argument("--json", type=Path, help="write raw results here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
