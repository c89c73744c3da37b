"""OOD detectors on a small network trained on real digits, exported to a bundle.

The model is trained once per session (tests/digitnet.py, about a second) so the detectors
see real, class-structured features; every detector is checked against pytorch-ood's
own scores, and the feature-based ones must separate digits from noise and from shapes.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from digitnet import FEATURES, PRE
from helpers import slow_fixture

from lensforge.data.preprocess import Preprocess
from lensforge.data.sources import open_source
from lensforge.data.splits import make_splits
from lensforge.data.table import ImageTable, load_table
from lensforge.deploy.bundle import MANIFEST_NAME, MODEL_FILE, bundle_file_hashes, load_bundle
from lensforge.deploy.guardrails import GUARDRAILS_KEY, OOD_FILE, OOD_SCORERS, load_guardrails
from lensforge.errors import ArtifactError, DataError, UsageError
from lensforge.stress.ood import (
    OOD_DETECTORS,
    OOD_SETS,
    OODContext,
    auroc,
    build_ood_set,
    evaluate_ood,
    fit_detector,
    fit_guardrails,
    fpr_at_tpr,
    ood_threshold,
)

N_OOD = 64


@pytest.fixture(scope="module")
def digits() -> ImageTable:
    return load_table(open_source("builtin:digits"), PRE)


@pytest.fixture(scope="module")
def digits_bundle(digitnet_bundle_template):
    """The session's DigitNet, trained on the training split (the split fit_guardrails makes with seed 0).

    Read-only: tests that write into a bundle copy it first.
    """
    return digitnet_bundle_template


@pytest.fixture(scope="module")
def evaluation(digits_bundle, digits):
    return evaluate_ood(digits_bundle, digits, ["uniform_noise", "other_source", "textures"], n_ood=N_OOD)


@slow_fixture(scope="module")
def guarded(digits_bundle, digits, tmp_path_factory):
    path = shutil.copytree(digits_bundle, tmp_path_factory.mktemp("guarded") / "bundle")
    report = fit_guardrails(path, "builtin:digits", n_ood=N_OOD)  # the same table and split as ``digits``
    return path, report


def test_the_model_learned_digits(evaluation, digits_bundle, digits):
    val = make_splits(digits, seed=0).val
    logits, _ = load_bundle(digits_bundle).predict_uint8(digits.images[val])
    assert (logits.argmax(1) == digits.targets[val]).mean() > 0.85


@pytest.mark.parametrize("detector", ["mahalanobis", "knn", "vim"])
def test_feature_detectors_separate_digits_from_noise_and_shapes(evaluation, detector):
    aurocs = evaluation.auroc(detector)
    assert aurocs["uniform_noise"] > 0.9
    assert aurocs["other_source"] > 0.9
    assert evaluation.fpr95(detector)["uniform_noise"] < 0.5


@pytest.mark.parametrize("detector", OOD_DETECTORS.list())
def test_numpy_scores_equal_pytorch_ood(evaluation, digits_bundle, detector):
    fitted = evaluation.detectors[detector]
    noise = np.random.default_rng(1).integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    logits, features = load_bundle(digits_bundle).predict_uint8(noise)
    ours, theirs = fitted.score(logits, features), fitted.reference(logits, features)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale)
    assert np.std(ours) > 0  # a constant would also "match"


def test_every_detector_has_a_numpy_scorer():
    assert OOD_DETECTORS.list() == OOD_SCORERS.list()


def test_scores_are_higher_for_ood(evaluation):
    for detector in evaluation.detectors:
        assert np.median(evaluation.ood_scores[detector]["uniform_noise"]) > np.median(evaluation.in_scores[detector])


def test_metrics_on_known_scores():
    in_scores, out_scores = np.arange(100.0), np.arange(50.0, 150.0)
    assert auroc(in_scores, out_scores) == pytest.approx(0.875)
    assert auroc(in_scores, in_scores + 1000) == 1.0
    threshold = ood_threshold(in_scores)
    assert np.mean(in_scores <= threshold) >= 0.95 and threshold == 95.0
    assert fpr_at_tpr(in_scores, out_scores) == pytest.approx(0.46)  # 50..95 accepted


def test_fit_guardrails_writes_detector_and_manifest(guarded, digits_bundle):
    path, report = guarded
    bundle = load_bundle(path)  # hashes verified
    spec = bundle.manifest[GUARDRAILS_KEY]
    assert set(spec) >= {"ood", "quality", "abstain"}
    assert spec["ood"]["detector"] == report["chosen"] != "msp"
    assert spec["ood"]["file"] == OOD_FILE and OOD_FILE in bundle.manifest["files"]
    assert spec["ood"]["fitted_on"]["split"] == "train" and spec["ood"]["selected_on"]["split"] == "val"
    means = {name: row["mean_auroc"] for name, row in report["detectors"].items()}
    assert report["chosen"] == max(means, key=means.get)
    assert report["gain_over_msp_auroc_points"] == pytest.approx(100 * (means[report["chosen"]] - means["msp"]))
    assert load_bundle(digits_bundle).manifest.get(GUARDRAILS_KEY) is None  # the copy changed, not the original
    assert spec["ood"]["fitted_on"]["data"] == "builtin:digits"
    assert spec["quality"]["thresholds"]["min_side_px"] == 8  # digits are 8x8 as stored
    json.dumps(report)  # the report is plain JSON


def test_report_has_histograms_and_risk_coverage(guarded):
    _, report = guarded
    for hist in report["histograms"].values():
        assert len(hist["edges"]) == 31
        assert sum(hist["counts"]["in_distribution"]) == report["in_distribution"]["val"]
        assert all(sum(hist["counts"][s]) == N_OOD for s in report["ood_sets"])
    curve = report["selective"]["curve"]
    assert curve["coverage"][-1] == 1.0 and len(curve["coverage"]) <= 101


def test_a_run_folder_gets_its_bundle_guarded_and_the_report(digits_bundle, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_bundle, run / "bundle")
    (run / "run.json").write_text(json.dumps({"data": "builtin:digits"}))
    report = fit_guardrails(run, n_ood=16, detector="mahalanobis")  # data: the run's own
    assert json.loads((run / "stress" / "ood.json").read_text())["chosen"] == report["chosen"] == "mahalanobis"
    assert set(report["detectors"]) == {"msp", "mahalanobis"}  # the chosen one and the baseline
    assert load_guardrails(load_bundle(run / "bundle")).ood.detector == "mahalanobis"


def test_threshold_keeps_95_percent_of_validation(guarded, digits):
    path, report = guarded
    guard = load_guardrails(load_bundle(path)).ood
    val = make_splits(digits, seed=0).val
    logits, features = load_bundle(path).predict_uint8(digits.images[val])
    kept = np.mean(guard.scores(logits, features) <= guard.threshold)
    assert 0.95 <= kept <= 0.97
    noise = build_ood_set("uniform_noise", OODContext(PRE, digits.class_names, digits.images[val], 64, seed=5))
    flagged = np.mean(guard.scores(*load_bundle(path).predict_uint8(noise)) > guard.threshold)
    assert flagged > 0.9


@pytest.mark.parametrize("name", OOD_SETS.list())
@pytest.mark.parametrize("pre", [PRE, Preprocess(input_size=(16, 12))], ids=["gray8", "rgb16x12"])
def test_ood_sets_are_seeded_images_at_the_model_input(name, pre, digits):
    in_images = np.full((20, pre.channels, *pre.input_size), 100, dtype=np.uint8)
    context = OODContext(pre, digits.class_names, in_images, 12, seed=3)
    images = build_ood_set(name, context)
    assert images.dtype == np.uint8 and images.shape == (12, pre.channels, *pre.input_size)
    assert np.array_equal(images, build_ood_set(name, context))
    assert images.std() > 0


def test_unknown_detector_and_set_suggest_names(digits_bundle, digits):
    with pytest.raises(UsageError, match="mahalanobis"):
        fit_guardrails(digits_bundle, digits, detector="mahalanobis2")
    with pytest.raises(UsageError, match="uniform_noise"):
        evaluate_ood(digits_bundle, digits, ["uniform_nois"])


def test_data_of_other_classes_is_a_data_error(digits_bundle):
    table = ImageTable(np.zeros((30, 1, 8, 8), np.uint8), np.arange(30) % 2, [f"x#{i}" for i in range(30)],
                       [None] * 30, ["cat", "dog"], "classification", PRE)
    with pytest.raises(DataError, match="cat"):
        evaluate_ood(digits_bundle, table)


def test_images_of_the_wrong_size_are_a_data_error(digits_bundle, digits):
    table = ImageTable(np.zeros((30, 1, 16, 16), np.uint8), digits.targets[:30], digits.origins[:30],
                       [None] * 30, digits.class_names, "classification", PRE)
    with pytest.raises(DataError, match="16, 16"):
        evaluate_ood(digits_bundle, table)


def test_bundle_without_features_output_is_refused(digits_bundle, digits, tmp_path):
    path = shutil.copytree(digits_bundle, tmp_path / "logits-only")
    model = onnx.load(str(path / MODEL_FILE))
    kept = [output for output in model.graph.output if output.name != "features"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(path / MODEL_FILE))
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["files"] = bundle_file_hashes(path)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="logits-only.*features"):
        fit_guardrails(path, digits)


def test_bundle_input_below_8_px_is_refused(digits_bundle, digits, tmp_path):
    path = shutil.copytree(digits_bundle, tmp_path / "tiny")
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["preprocess"]["input_size"] = [6, 6]
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="below 8 px"):
        fit_guardrails(path, digits)


def test_subset_of_classes_fits_mahalanobis_on_present_classes(evaluation, digits):
    train = evaluation.detectors  # fitted on all ten classes
    assert train["mahalanobis"].params["means"].shape == (10, FEATURES)
    from lensforge.stress.ood import Outputs

    rng = np.random.default_rng(0)
    subset = Outputs(rng.normal(size=(60, 10)).astype(np.float32), rng.normal(size=(60, 8)).astype(np.float32),
                     np.repeat([2, 5, 7], 20))
    fitted = fit_detector("mahalanobis", subset)
    assert fitted.params["means"].shape == (3, 8) and fitted.info["classes"] == 3
