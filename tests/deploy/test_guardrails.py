"""Guardrails at inference (NumPy): scorers, loading from a bundle, checks per image, damage."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest

from lensforge.data.table import ImageTable
from lensforge.deploy.bundle import load_bundle, update_bundle
from lensforge.deploy.guardrails import (
    GUARDRAILS_KEY,
    OOD_FILE,
    Guardrails,
    QualityThresholds,
    guardrails_for,
    load_guardrails,
    params_from_npz,
    params_to_npz,
    score_ood,
)
from lensforge.errors import ArtifactError, UsageError


def photo_table(images: np.ndarray, class_names: list[str], pre) -> ImageTable:
    n = len(images)
    return ImageTable(images, np.arange(n) % len(class_names), [f"photo#{i}" for i in range(n)], [None] * n,
                      list(class_names), "classification", pre)


@pytest.fixture(scope="module")
def guarded(bundle, images_for, class_names, tmp_path_factory):
    """A copy of the default bundle with guardrails fitted on 200 photo-like images."""
    from lensforge.stress.ood import fit_guardrails

    path = shutil.copytree(bundle.path, tmp_path_factory.mktemp("guarded") / "bundle")
    table = photo_table(images_for(bundle.pre, 200, seed=3), class_names, bundle.pre)
    report = fit_guardrails(path, table, n_ood=24, detector="knn")
    return path, report


def test_no_guardrails_means_none(bundle):
    assert load_guardrails(load_bundle(bundle.path)) is None


def test_check_gives_every_fitted_part_per_image(guarded, images_for, bundle):
    path, report = guarded
    loaded = load_bundle(path)
    guardrails = load_guardrails(loaded)
    assert guardrails.ood.detector == "knn" == report["chosen"]
    assert guardrails.ood.threshold == loaded.manifest[GUARDRAILS_KEY]["ood"]["threshold"]
    images = images_for(bundle.pre, 6, seed=9)
    logits, features = loaded.predict_uint8(images)
    rows = guardrails.check(logits, features, images, [(64, 64)] * 5 + [(4, 4)])
    for row in rows:
        assert set(row) == {"ood", "ood_score", "quality", "abstain"}
        assert isinstance(row["ood"], bool) and isinstance(row["abstain"], bool)
        assert row["ood"] == (row["ood_score"] > guardrails.ood.threshold)
    assert "too_small" in rows[-1]["quality"] and "too_small" not in rows[0]["quality"]


def test_guardrails_are_read_once_per_bundle_object(guarded):
    loaded = load_bundle(guarded[0])
    assert guardrails_for(loaded) is guardrails_for(loaded)
    assert guardrails_for(load_bundle(guarded[0])) is not guardrails_for(loaded)


def test_only_fitted_parts_are_reported():
    limits = QualityThresholds(10.0, 0.9, 0.0, 2.0, 8)
    images = np.zeros((2, 1, 8, 8), np.uint8)
    rows = Guardrails(quality=limits).check(np.zeros((2, 3)), np.zeros((2, 4)), images)
    assert rows == [{"quality": ["too_dark", "low_contrast"]}] * 2


def test_scorers_on_hand_made_parameters():
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    features = np.array([[3.0, 4.0], [0.0, 2.0]])
    assert score_ood("msp", {"temperature": np.float64(1.0)}, logits, features) == pytest.approx(
        [-1 / (1 + np.exp(-2)), -0.5])
    assert score_ood("energy", {}, logits, features) == pytest.approx(-np.log(np.exp(logits).sum(1)))
    means, precision = np.array([[3.0, 4.0], [0.0, 0.0]]), np.eye(2)
    assert score_ood("mahalanobis", {"means": means, "precision": precision}, logits, features) == pytest.approx(
        [0.0, 2.0])  # half the squared distance to the closest mean
    bank = np.array([[1.0, 0.0], [0.6, 0.8]])
    knn = score_ood("knn", {"bank": bank, "k": np.int64(1)}, logits, features)
    assert knn == pytest.approx([0.0, np.hypot(0.6, 0.2)])  # unit-normalised, nearest bank row
    vim = {"weight": np.eye(2), "bias": np.zeros(2), "origin": np.zeros(2), "residual_space": np.array([[0.0], [1.0]]),
           "alpha": np.float64(2.0)}
    energy = np.log(np.exp(features).sum(1))  # the head is the identity: logits = features
    assert score_ood("vim", vim, logits, features) == pytest.approx(2 * features[:, 1] - energy)


def test_npz_round_trip_refuses_pickles_and_missing_arrays():
    params = {"bank": np.eye(3, dtype=np.float32), "k": np.int64(2)}
    back = params_from_npz(params_to_npz(params), "knn", "here")
    assert np.array_equal(back["bank"], params["bank"]) and int(back["k"]) == 2
    with pytest.raises(ArtifactError, match="lacks k"):
        params_from_npz(params_to_npz({"bank": params["bank"]}), "knn", "here")
    with pytest.raises(ArtifactError, match="not a readable"):
        params_from_npz(params_to_npz({"bank": np.array([{"evil": 1}], dtype=object), "k": 2}), "knn", "here")
    with pytest.raises(UsageError, match="unknown ood scorer"):
        score_ood("magic", {}, np.zeros((1, 2)), np.zeros((1, 2)))


def test_damaged_guardrails_are_artifact_errors(guarded, tmp_path):
    path = shutil.copytree(guarded[0], tmp_path / "damaged")
    with pytest.raises(ArtifactError, match="ood.npz is not a readable"):
        load_guardrails(update_bundle(path, files={OOD_FILE: b"not an npz"}))
    spec = copy.deepcopy(load_bundle(guarded[0]).manifest[GUARDRAILS_KEY])
    spec["ood"]["detector"] = "magic"
    with pytest.raises(ArtifactError, match="unknown OOD detector 'magic'"):
        load_guardrails(update_bundle(path, updates={GUARDRAILS_KEY: spec}))
    spec["ood"], spec["abstain"] = None, {"temperature": 1.0}
    with pytest.raises(ArtifactError, match="invalid 'guardrails'.*threshold"):
        load_guardrails(update_bundle(path, updates={GUARDRAILS_KEY: spec}))
