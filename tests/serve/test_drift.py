"""The drift monitor on real digits with a NumPy nearest-centroid "model" (no torch needed).

The reference is fitted on the validation split; the test split plays in-distribution
traffic, and darkened images, uniform noise or a single class play drifted traffic.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lensforge.data.preprocess import Preprocess
from lensforge.data.sources import open_source
from lensforge.data.splits import make_splits
from lensforge.data.table import load_table
from lensforge.deploy.drift import DriftReference, kolmogorov_sf, ks_2samp, psi
from lensforge.errors import ArtifactError, UsageError
from lensforge.serve.drift import DriftMonitor
from lensforge.stress.drift_reference import fit_drift_reference

PRE = Preprocess(input_size=(8, 8), channels=1, mean=(0.5,), std=(0.5,))


class CentroidModel:
    """Logits = minus the scaled squared distance to each class's mean training image."""

    def __init__(self, images: np.ndarray, targets: np.ndarray) -> None:
        flat = images.reshape(len(images), -1) / 255.0
        self.centroids = np.stack([flat[targets == k].mean(0) for k in range(10)])
        self.ood_threshold = np.inf

    def logits(self, images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1) / 255.0
        return -3.0 * ((flat[:, None] - self.centroids[None]) ** 2).sum(-1)

    def probs(self, images: np.ndarray) -> np.ndarray:
        logits = self.logits(images)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def ood(self, images: np.ndarray) -> np.ndarray:
        return -self.logits(images).max(1) > self.ood_threshold  # distance to the closest centroid


@pytest.fixture(scope="module")
def data():
    table = load_table(open_source("builtin:digits"), PRE)
    splits = make_splits(table, seed=0)
    model = CentroidModel(table.images[splits.train], table.targets[splits.train])
    val = table.images[splits.val]
    model.ood_threshold = float(np.quantile(-model.logits(val).max(1), 0.95, method="higher"))
    reference = fit_drift_reference(val, model.logits(val), ood_flags=model.ood(val), fitted_on={"data": "digits"})
    return SimpleNamespace(table=table, splits=splits, model=model, reference=reference)


def monitor(data, window: int = 1000, **kw) -> DriftMonitor:
    bundle = SimpleNamespace(manifest={"guardrails": {"drift": data.reference}}, path="digits", temperature=1.0)
    return DriftMonitor.from_bundle(bundle, window, **kw)


def feed(mon: DriftMonitor, data, images: np.ndarray, batch: int = 32) -> None:
    for start in range(0, len(images), batch):
        part = images[start:start + batch]
        mon.update(part, data.model.probs(part), data.model.ood(part))


def shifted(data, kind: str) -> np.ndarray:
    test = data.table.images[data.splits.test]
    if kind == "darkened":
        return (test * 0.3).astype(np.uint8)
    if kind == "uniform_noise":
        return np.random.default_rng(0).integers(0, 256, test.shape, dtype=np.uint8)
    return data.table.images[data.table.targets == 1]  # one class only (every split: ~180 images)


# ---------------------------------------------------------------------------- the statistics


@pytest.mark.parametrize(("n", "m", "shift"), [(30, 200, 0.0), (270, 269, 0.2), (1000, 500, 0.05), (80, 60, 1.0)])
def test_ks_equals_scipy(n, m, shift):
    rng = np.random.default_rng(n)
    a, b = rng.normal(shift, 1, n), rng.normal(0, 1, m)
    d, p = ks_2samp(a, b)
    expected = scipy_stats.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(expected.statistic, abs=1e-12)
    assert p == pytest.approx(expected.pvalue, abs=0.02, rel=0.1)  # Stephens' form vs SciPy's finite-n distribution
    ties = rng.integers(0, 5, n).astype(float), rng.integers(0, 5, m).astype(float)
    assert ks_2samp(*ties)[0] == pytest.approx(scipy_stats.ks_2samp(*ties).statistic, abs=1e-12)


def test_kolmogorov_series_equals_scipy():
    x = np.r_[0.0, 1e-4, np.linspace(0.05, 5, 400)]
    np.testing.assert_allclose(kolmogorov_sf(x), scipy_stats.kstwobign.sf(x), atol=1e-13, rtol=1e-9)
    assert kolmogorov_sf(1.36).shape == ()  # a scalar in, a scalar out: P(K > 1.36) ~ 0.05
    assert float(kolmogorov_sf(1.36)) == pytest.approx(0.0495, abs=1e-3)


def test_psi_known_values():
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * np.log(1.8) + 0.4 * np.log(5))
    assert np.isfinite(psi([1.0, 0.0], [0.0, 1.0]))  # empty bins are floored, not infinite


# ---------------------------------------------------------------------------- verdicts


def test_in_distribution_traffic_raises_no_alarm(data):
    mon = monitor(data)
    feed(mon, data, data.table.images[data.splits.test])
    report = mon.report()
    assert report["observed"] == report["total_seen"] == len(data.splits.test) >= report["min_observed"]
    assert report["alarms"] == [] and report["drifting"] is False
    psis = {name: value for name, value in report["scores"].items() if name.startswith("psi_")}
    assert set(psis) >= {"psi_mean_luminance", "psi_contrast", "psi_sharpness", "psi_predicted_class",
                         "psi_confidence"}
    assert max(psis.values()) < 0.15
    assert min(v for k, v in report["scores"].items() if k.startswith("ks_p_")) > 0.01
    assert report["scores"]["ood_rate"] < 0.12 and report["scores"]["ood_rate_reference"] <= 0.05
    json.dumps(report)


@pytest.mark.parametrize(("kind", "expected", "not_expected"), [
    ("darkened", {"psi_mean_luminance", "psi_contrast", "ks_p_mean_luminance"}, {"psi_sharpness"}),
    ("uniform_noise", {"ood_rate", "psi_sharpness", "ks_p_sharpness", "psi_predicted_class"}, set()),
    ("one_class", {"psi_predicted_class"}, set()),
])
def test_shifted_traffic_alarms_on_the_right_scores(data, kind, expected, not_expected):
    mon = monitor(data, min_observed=100)
    feed(mon, data, shifted(data, kind))
    report = mon.report()
    assert report["drifting"] is True
    assert expected <= set(report["alarms"]), report["alarms"]
    assert not not_expected & set(report["alarms"])  # sharpness is blind to brightness and contrast


def test_no_verdict_below_min_observed(data):
    mon = monitor(data)  # min_observed 200
    noise = shifted(data, "uniform_noise")
    feed(mon, data, noise[:150])
    report = mon.report()
    assert report["observed"] == 150 < report["min_observed"] == 200
    assert report["scores"]["psi_sharpness"] > 0.25  # scores are there, the verdict is not
    assert report["alarms"] == report["warnings"] == [] and report["drifting"] is False
    feed(mon, data, noise[150:])
    assert mon.report()["drifting"] is True


def test_the_window_forgets_old_images_and_logs_each_flip_once(data, caplog):
    mon = monitor(data, window=250)
    noise, test = shifted(data, "uniform_noise"), data.table.images[data.splits.test]
    with caplog.at_level(logging.INFO, logger="lensforge.serve.drift"):
        feed(mon, data, noise[:250], batch=10)
        assert mon.report()["drifting"] is True
        feed(mon, data, noise[:100], batch=10)  # still drifting: no second warning
        feed(mon, data, test[:250], batch=10)  # the noise has left the window
        report = mon.report()
    assert report["observed"] == 250 and report["total_seen"] == 600
    assert report["drifting"] is False and report["alarms"] == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    cleared = [r for r in caplog.records if r.levelno == logging.INFO and "cleared" in r.getMessage()]
    assert len(warnings) == 1 and "ood_rate" in warnings[0].getMessage() and len(cleared) == 1


def test_a_batch_larger_than_the_window_keeps_its_newest_images(data):
    mon = monitor(data, window=100, min_observed=100)
    noise, test = shifted(data, "uniform_noise"), data.table.images[data.splits.test]
    images = np.concatenate([noise[:150], test[:100]])
    mon.update(images, data.model.probs(images), data.model.ood(images))
    report = mon.report()
    assert report["observed"] == 100 and report["total_seen"] == 250 and report["drifting"] is False


def test_ood_flags_may_be_missing(data):
    mon = monitor(data, min_observed=100)
    noise = shifted(data, "uniform_noise")
    mon.update(noise, data.model.probs(noise), None)
    report = mon.report()
    assert "ood_rate" not in report["scores"] and "ood_rate" not in report["alarms"] and report["drifting"]


def test_gauges_are_flat_numbers_with_metric_safe_names(data):
    mon = monitor(data)
    feed(mon, data, data.table.images[data.splits.test])
    gauges = mon.gauges()
    assert all(re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name) for name in gauges)
    assert all(isinstance(value, float) and np.isfinite(value) for value in gauges.values())
    assert gauges["drifting"] == 0.0 and gauges["observed"] == len(data.splits.test)
    assert gauges["psi_mean_luminance"] == mon.report()["scores"]["psi_mean_luminance"]


def test_concurrent_updates_and_reports(data):
    mon = monitor(data, window=500)
    test = data.table.images[data.splits.test]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                feed(mon, data, test[:100], batch=7)
                mon.report()
        except BaseException as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    report = mon.report()
    assert report["total_seen"] == 1200 and report["observed"] == 500


def test_bad_inputs_and_references(data):
    mon = monitor(data)
    images = data.table.images[:4]
    with pytest.raises(UsageError, match="probs"):
        mon.update(images, np.ones((4, 3)) / 3, None)
    with pytest.raises(UsageError, match="OOD flags"):
        mon.update(images, data.model.probs(images), np.zeros(3, bool))
    with pytest.raises(UsageError, match="window"):
        monitor(data, window=0)
    assert DriftMonitor.from_bundle(SimpleNamespace(manifest={}, path="x")) is None
    assert DriftMonitor.from_bundle(SimpleNamespace(manifest={"guardrails": {"ood": {}}}, path="x")) is None
    newer = SimpleNamespace(manifest={"guardrails": {"drift": {**data.reference, "version": 2}}}, path="b")
    with pytest.raises(ArtifactError, match="version 2.*upgrade"):
        DriftMonitor.from_bundle(newer)
    broken = SimpleNamespace(manifest={"guardrails": {"drift": {"version": 1, "images": 3}}}, path="b")
    with pytest.raises(ArtifactError, match="bundle b: guardrails.drift"):
        DriftMonitor.from_bundle(broken)


def test_the_reference_survives_json(data):
    again = DriftReference.from_dict(json.loads(json.dumps(data.reference)), "x").to_dict()
    assert again == data.reference


def test_the_serving_path_never_imports_torch_or_scipy(data, tmp_path):
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(data.reference))
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["torch"] = None  # any import of torch or scipy now fails
        sys.modules["scipy"] = None
        from types import SimpleNamespace
        import numpy as np
        from lensforge.serve.drift import DriftMonitor
        bundle = SimpleNamespace(manifest={{"guardrails": {{"drift": json.load(open({str(path)!r}))}}}}, path="b")
        mon = DriftMonitor.from_bundle(bundle, 100, min_observed=50)
        images = np.random.default_rng(0).integers(0, 256, (60, 1, 8, 8), dtype=np.uint8)
        mon.update(images, np.full((60, 10), 0.1), np.ones(60, bool))
        assert mon.report()["drifting"] and mon.gauges()["drifting"] == 1.0
        assert not {{"torch", "scipy"}} & {{name for name, mod in sys.modules.items() if mod is not None}}
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
