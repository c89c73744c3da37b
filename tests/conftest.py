"""Shared fixtures (tiny image folders, one trained digits run, one DigitNet bundle) and the ``slow`` tier.

A test is marked ``slow`` when it, or any fixture it uses, trains, exports or serves a model
or starts a process: fixtures declare it with ``helpers.slow_fixture``, and a test or fixture
that calls one of :data:`EXPENSIVE_CALLS` (itself or through a helper under tests/) is found
from the names its code uses. ``make test-quick`` runs ``-m "not slow"``; ``make test`` runs all.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: see lensforge.cli.quiet_cpu_threads
import dis
import importlib
import inspect
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, FunctionType

import pytest
from helpers import slow_fixture, write_image_folder

TESTS_DIR = Path(__file__).parent
# (module, attribute): calling it trains, exports or serves; None: using the module at all
# (subprocess: the CLI end to end, a real server, a fresh interpreter).
EXPENSIVE_CALLS = (
    ("lensforge.train", "train"),
    ("lensforge.autopilot", "autopilot"),
    ("lensforge.tune", "tune"),
    ("lensforge.train.lr_find", "lr_find"),
    ("lensforge.planning", "plan_run"),
    ("lensforge.select", "select"),
    ("lensforge.deploy.export", "export_onnx"),
    ("lensforge.deploy.export", "export_onnx_result"),
    ("lensforge.deploy.export", "write_bundle"),
    ("lensforge.deploy.from_run", "export_run"),
    ("lensforge.serve", "create_app"),
    ("subprocess", None),
)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "imgs")


@slow_fixture(scope="session")
def digits_run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny trained and exported digits run (tinycnn_xs, 8 px, 3 epochs) for the whole session.

    Read-only: tests that write into a run (calibrate, guard, stress) take ``digits_run``, a copy.
    """
    from lensforge.deploy.from_run import export_run
    from lensforge.train import resolve_config, train

    out = tmp_path_factory.mktemp("digits-template") / "run"
    train(resolve_config(None, data="builtin:digits", model="tinycnn_xs", image_size=8, epochs=3, out=str(out)),
          show_progress=False)
    export_run(out)
    return out


@pytest.fixture(scope="module")
def digits_run(digits_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the session's digits run, per test module (it may be calibrated, guarded, stressed)."""
    return Path(shutil.copytree(digits_run_template, tmp_path_factory.mktemp("digits") / "run"))


@slow_fixture(scope="session")
def guarded_digits_run_template(digits_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's digits run, calibrated and with guardrails fitted (default detector, 64 OOD images).

    Read-only, like ``digits_run_template``: copy it before writing into it.
    """
    from lensforge.stress.calibration import calibrate
    from lensforge.stress.ood import fit_guardrails

    out = Path(shutil.copytree(digits_run_template, tmp_path_factory.mktemp("digits-guarded") / "run"))
    calibrate(out)
    fit_guardrails(out, n_ood=64)
    return out


@slow_fixture(scope="session")
def digitnet_bundle_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DigitNet bundle (tests/digitnet.py) trained on digits' training split, for the whole session.

    Read-only: tests that calibrate it or fit guardrails copy it first.
    """
    from digitnet import PRE, digitnet_bundle

    from lensforge.data import open_source
    from lensforge.data.table import load_table

    digits = load_table(open_source("builtin:digits"), PRE)
    return digitnet_bundle(digits, tmp_path_factory.mktemp("digitnet") / "bundle")


DETECTION_DATA = "builtin:shapes?task=detect&n=300&size=64&seed=0"  # tiny: 64 px, 1-6 shapes per image


@slow_fixture(scope="session")
def detection_run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny trained and exported detection run (fcos_tiny, 64 px, 3 epochs) for the whole session.

    It detects little (mAP near 0 after 3 epochs): enough for every stage's plumbing, export
    parity and row formats, not for accuracy. Read-only: copy it before writing into it.
    """
    from lensforge.deploy.from_run import export_run
    from lensforge.train import resolve_config, train

    out = tmp_path_factory.mktemp("detection-template") / "run"
    train(resolve_config(None, data=DETECTION_DATA, model="fcos_tiny", epochs=3, out=str(out)), show_progress=False)
    export_run(out)
    return out


def make_eager(run_dir: Path) -> Path:
    """Set the run's bundle's shipped score threshold near zero (in place; the run must be a copy).

    The tiny template run has learned little, and how little varies with the machine, so the
    threshold it chose on validation may leave an image without a single detection. Tests of
    geometry, formats and agreement need boxes, not good ones: this copy shows the top
    ``max_detections`` of every image. The bundle's files and hashes are untouched.
    """
    manifest_path = run_dir / "bundle" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["detection"]["score_threshold"] = 0.001
    manifest_path.write_text(json.dumps(manifest))
    return run_dir


@slow_fixture(scope="session")
def eager_detection_run_template(detection_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``detection_run_template`` whose bundle shows detections on every image (see make_eager).

    Read-only, like the template.
    """
    return make_eager(Path(shutil.copytree(detection_run_template, tmp_path_factory.mktemp("eager") / "run")))


# ---------------------------------------------------------------------------- the slow tier


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    expensive = _expensive_ids()
    verdicts: dict[CodeType, bool] = {}
    for item in items:
        if _is_slow(item, expensive, verdicts):
            item.add_marker(pytest.mark.slow)


def _expensive_ids() -> set[int]:
    """ids of the objects in EXPENSIVE_CALLS that import here (torch-free installs lack some)."""
    found = set()
    for module_name, attribute in EXPENSIVE_CALLS:
        try:
            module = importlib.import_module(module_name)
            found.add(id(module if attribute is None else getattr(module, attribute)))
        except (ImportError, AttributeError):
            continue
    return found


def _is_slow(item: pytest.Item, expensive: set[int], verdicts: dict[CodeType, bool]) -> bool:
    fixture_info = getattr(item, "_fixtureinfo", None)
    definitions = fixture_info.name2fixturedefs.values() if fixture_info else []
    fixtures = [definition.func for group in definitions for definition in group]
    if any(getattr(function, "slow", False) for function in fixtures):
        return True
    functions = [getattr(item, "function", None), *fixtures]
    return any(_calls_expensive(f, expensive, verdicts) for f in functions if _defined_in_tests(f))


def _defined_in_tests(obj: object) -> bool:
    function = inspect.unwrap(obj) if callable(obj) else obj  # through decorators (fixture, contextmanager)
    return isinstance(function, FunctionType) and TESTS_DIR in Path(function.__code__.co_filename).parents


def _calls_expensive(function: FunctionType, expensive: set[int], verdicts: dict[CodeType, bool]) -> bool:
    """Whether ``function`` uses an expensive call, itself or through functions defined under tests/.

    Reads the global names and the imports in its code (and nested code): ``.train()`` on a
    model is an attribute, not lensforge's ``train``.
    """
    function = inspect.unwrap(function)
    code = function.__code__
    if code in verdicts:
        return verdicts[code]
    verdicts[code] = False  # while we look: recursion ends here
    verdicts[code] = any(id(obj) in expensive or (_defined_in_tests(obj) and _calls_expensive(obj, expensive, verdicts))
                         for obj in _referenced(code, function.__globals__))
    return verdicts[code]


def _referenced(code: CodeType, scope: dict[str, object]) -> Iterator[object]:
    """The objects ``code`` loads as globals or imports, nested functions included."""
    module = None
    for instruction in dis.get_instructions(code):
        name = instruction.argval
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME") and name in scope:
            yield scope[name]
        elif instruction.opname == "IMPORT_NAME":
            module = sys.modules.get(name)
            if module is not None:
                yield module
        elif instruction.opname == "IMPORT_FROM" and module is not None and name in vars(module):
            yield vars(module)[name]
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            yield from _referenced(constant, scope)
