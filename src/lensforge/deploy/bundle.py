"""Load and verify a bundle: the self-describing folder that ships (NumPy + ONNX Runtime only).

A bundle is ``manifest.json`` plus the files it lists with their SHA-256 and size
(``model.onnx`` first; later stages add OOD and drift files). This module never
imports torch: ``lensforge predict`` and the server run on it alone.

Format version 2 (current): ``model.onnx`` takes raw uint8 pixels (N, C, H, W) at the
input size, channels RGB or L, and normalises them inside the graph. Version 1 bundles
(float32 input normalised outside the model) still load: :meth:`Bundle.model_input` turns
uint8 pixels into whatever the bundle's model takes, as its manifest's ``inputs[0].dtype``
says, so every caller feeds uint8 and never needs to know the version.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnxruntime as ort

from lensforge.data.preprocess import Preprocess, normalize, normalize_affine
from lensforge.errors import ArtifactError, UsageError
from lensforge.utils.io import atomic_write_bytes, atomic_write_json, replace_dir, sha256_file, staging_dir

BUNDLE_FORMAT = "lensforge-bundle"
FORMAT_VERSION = 2  # bump when a reader of the old version would misread a new bundle
# 1: model.onnx takes normalised float32; 2: it takes uint8 pixels and normalises them itself
INPUT_DTYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}  # manifest dtype -> ORT type
MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.onnx"
_REQUIRED_KEYS = ("task", "class_names", "preprocess", "inputs", "outputs", "files")
# keys derive_bundle owns: a caller's ``updates`` may not set them
_DERIVED_KEYS = ("format", "format_version", "files", "created", "parent", "precision")


def bundle_file_hashes(folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{relative/posix/path: {"sha256", "bytes"}}`` for every file in ``folder`` but the manifest."""
    folder = Path(folder)
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME:
            continue
        hashes[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return hashes


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a folder whose manifest.json says it is a lensforge bundle (no hashing)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and sanity-check ``path/manifest.json``; raises :class:`ArtifactError`."""
    where = f"bundle {path}"
    folder = Path(path)
    if not folder.is_dir():
        why = "no such folder" if not folder.exists() else "not a folder"
        raise ArtifactError(f"{where}: {why}, not a lensforge bundle")
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(f"{where}: no {MANIFEST_NAME}, not a lensforge bundle")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{where}: cannot read {MANIFEST_NAME} ({e})") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{where}: {MANIFEST_NAME} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{where}: {MANIFEST_NAME} format is {found!r}, not {BUNDLE_FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: format_version {version!r} is not one this lensforge reads "
            f"(<= {FORMAT_VERSION}); upgrade lensforge"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ArtifactError(f"{where}: {MANIFEST_NAME} lacks {', '.join(missing)}")
    if not isinstance(manifest["files"], dict) or MODEL_FILE not in manifest["files"]:
        raise ArtifactError(f"{where}: {MANIFEST_NAME} does not list {MODEL_FILE}")
    return manifest


def verify_files(path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists exists with the recorded size and SHA-256."""
    folder = Path(path)
    for name, entry in manifest["files"].items():
        file = _listed_file(folder, name, path)
        expected_sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(expected_sha, str):
            raise ArtifactError(f"bundle {path}: {MANIFEST_NAME} has no sha256 for {name}")
        if not file.is_file():
            raise ArtifactError(f"bundle {path}: {name} is missing (listed in {MANIFEST_NAME})")
        size, expected_size = file.stat().st_size, entry.get("bytes")
        if expected_size is not None and size != expected_size:
            raise ArtifactError(
                f"bundle {path}: {name} size mismatch (expected {expected_size} bytes, "
                f"got {size}): the file was altered or damaged"
            )
        actual_sha = sha256_file(file)
        if actual_sha != expected_sha:
            raise ArtifactError(
                f"bundle {path}: {name} sha256 mismatch (expected {expected_sha[:12]}..., "
                f"got {actual_sha[:12]}...): the file was altered or damaged"
            )


def _listed_file(folder: Path, name: str, shown: Any) -> Path:
    """Resolve a manifest file name, refusing absolute paths and ``..`` (untrusted bundles)."""
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in name:
        raise ArtifactError(f"bundle {shown}: {MANIFEST_NAME} lists an unsafe file name {name!r}")
    return folder.joinpath(*rel.parts)


class Bundle:
    """A loaded bundle: manifest, preprocessing, class names and a lazy ONNX Runtime session."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: dict[str, Any],
        *,
        intra_op_num_threads: int | None = None,
        spin: bool = True,
    ) -> None:
        self.path = Path(path)
        # ORT's worker threads spin between calls by default: lowest latency for one caller, but
        # ~2 ms of burnt CPU per call, which a server sharing its cores with HTTP handling pays for
        self.spin = spin
        self.manifest = manifest
        where = f"bundle {path}"
        try:
            self.preprocess = Preprocess.from_dict(manifest["preprocess"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: invalid preprocess in {MANIFEST_NAME} ({e})") from None
        names = manifest["class_names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ArtifactError(f"{where}: class_names must be a non-empty list of strings")
        self.class_names: list[str] = names
        temperature = manifest.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ArtifactError(
                f"{where}: temperature must be a positive number, not {temperature!r}"
            )
        self.temperature = float(temperature)
        try:
            self.input_name = str(manifest["inputs"][0]["name"])
            # every manifest lensforge wrote says; the default covers hand-written ones
            default = "uint8" if manifest.get("format_version", 1) >= 2 else "float32"
            self.input_dtype = str(manifest["inputs"][0].get("dtype", default))
        except (AttributeError, KeyError, IndexError, TypeError):
            raise ArtifactError(
                f"{where}: inputs in {MANIFEST_NAME} must list the input name"
            ) from None
        if self.input_dtype not in INPUT_DTYPES:
            raise ArtifactError(
                f"{where}: input dtype {self.input_dtype!r} in {MANIFEST_NAME} is not one of "
                f"{', '.join(INPUT_DTYPES)}"
            )
        self.intra_op_num_threads = intra_op_num_threads or _available_cores()
        self._session: ort.InferenceSession | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, model={self.manifest.get('model')!r})"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def session(self) -> ort.InferenceSession:
        """The ONNX Runtime session, created on first use (CPU provider)."""
        with self._lock:
            if self._session is None:
                self._session = self._create_session()
            return self._session

    def _create_session(self) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_num_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; warnings about unused initializers are noise
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = self.path / MODEL_FILE
        try:
            session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises several unrelated types for a bad file
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(
                f"bundle {self.path}: ONNX Runtime cannot load {MODEL_FILE} ({cause})"
            ) from e
        found = {i.name: i.type for i in session.get_inputs()}
        if found.get(self.input_name) != INPUT_DTYPES[self.input_dtype]:
            raise ArtifactError(
                f"bundle {self.path}: {MANIFEST_NAME} says {MODEL_FILE} takes {self.input_name!r} as "
                f"{self.input_dtype}, but its inputs are {found}"
            )
        return session

    def predict_uint8(self, batch_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 pixels (N, C, H, W) at the input size -> (logits (N, K), features (N, D)).

        The entry point for every caller, whatever the bundle's format version: the pixels go
        to the model as they are (version 2) or normalised in NumPy first (version 1).
        """
        return self._run(self.model_input(batch_uint8))

    @property
    def task(self) -> str:
        return str(self.manifest.get("task", "classification"))

    @property
    def output_names(self) -> list[str]:
        return [str(o["name"]) for o in self.manifest.get("outputs", [])] or ["logits", "features"]

    def outputs_uint8(self, batch_uint8: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 pixels (N, C, H, W) -> every output of ``model.onnx`` by name (any task)."""
        names = self.output_names
        return dict(zip(names, self.session.run(names, {self.input_name: self.model_input(batch_uint8)})))

    def model_input(self, batch_uint8: np.ndarray) -> np.ndarray:
        """uint8 pixels (N, C, H, W) -> the array ``model.onnx`` takes (to feed ONNX Runtime directly).

        The pixels themselves for a version-2 bundle; normalised float32 for a version-1 one.
        """
        if not isinstance(batch_uint8, np.ndarray) or batch_uint8.dtype != np.uint8:
            dtype = getattr(batch_uint8, "dtype", type(batch_uint8).__name__)
            raise UsageError(f"predict_uint8 needs a uint8 array, not {dtype}")
        self._check_shape(batch_uint8)
        if self.input_dtype == "uint8":
            return np.ascontiguousarray(batch_uint8)
        return normalize(batch_uint8, self.preprocess)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised float32 (N, C, H, W) -> (logits, features); kept for older callers.

        Prefer :meth:`predict_uint8`. A version-2 model takes pixels, so ``batch`` is mapped back
        to pixels and rounded to the nearest of the 256 grey levels: exact for images that
        came from uint8 pixels, a rounding of at most half a grey level for any other.
        """
        batch = np.asarray(batch, dtype=np.float32)
        self._check_shape(batch)
        if self.input_dtype == "float32":
            return self._run(np.ascontiguousarray(batch))
        scale, shift = normalize_affine(self.preprocess.mean, self.preprocess.std)
        pixels = (batch - shift.reshape(1, -1, 1, 1)) / scale.reshape(1, -1, 1, 1)
        return self._run(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))

    def _run(self, model_input: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run(["logits", "features"], {self.input_name: model_input})
        return logits, features

    def _check_shape(self, batch: np.ndarray) -> None:
        expected = (self.preprocess.channels, *self.preprocess.input_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected or batch.shape[0] < 1:
            raise UsageError(
                f"bundle {self.path} expects a batch of shape (N, {', '.join(map(str, expected))}), "
                f"got {tuple(batch.shape)}"
            )


def load_bundle(
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    intra_op_num_threads: int | None = None,
    spin: bool = True,
) -> Bundle:
    """Read a bundle's manifest and (by default) check every listed file's size and SHA-256.

    Raises:
        ArtifactError: not a bundle, unreadable manifest, a listed file missing or altered.
    """
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    elif not (Path(path) / MODEL_FILE).is_file():
        raise ArtifactError(f"bundle {path}: {MODEL_FILE} is missing (listed in {MANIFEST_NAME})")
    return Bundle(path, manifest, intra_op_num_threads=intra_op_num_threads, spin=spin)


def _available_cores() -> int:
    # the cores this process may run on (containers and taskset), not every core of the host
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def derive_bundle(
    parent: Bundle | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    model: str | os.PathLike[str] | bytes,
    *,
    precision: str,
    updates: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle with a new ``model.onnx`` (quantized, pruned, ...) made from ``parent``'s.

    The manifest is the parent's with ``precision``, ``parent`` (``{"path", "model_sha256"}``),
    ``updates`` merged over the top-level keys, fresh file hashes and ``created``. The parent's
    ``metrics`` and ``parity`` described its own model, so they are dropped unless ``updates``
    gives new ones. Its other listed files (OOD, drift statistics) are copied unchanged and
    re-checked against its hashes. The new model must load in ONNX Runtime with the parent's
    input name and dtype and the ``logits`` and ``features`` outputs. The folder is built as a hidden
    sibling and moved into place when complete; on failure it is removed and an existing
    bundle at ``out_dir`` is left as it was.

    Raises:
        UsageError: ``out_dir`` is the parent, or a folder that is not a bundle; reserved keys in
            ``updates``.
        ArtifactError: the parent is altered, or the new model does not load or lacks an output.
    """
    parent = parent if isinstance(parent, Bundle) else load_bundle(parent)
    out_dir = Path(out_dir)
    updates = dict(updates or {})
    _check_derive_args(parent, out_dir, updates)
    tmp = staging_dir(out_dir)
    try:
        _copy_companion_files(parent, tmp)
        data = model if isinstance(model, bytes) else Path(model).read_bytes()
        atomic_write_bytes(tmp / MODEL_FILE, data)
        _check_derived_model(tmp / MODEL_FILE, parent.input_name, parent.input_dtype, parent.output_names)
        manifest = copy.deepcopy(parent.manifest)
        manifest.pop("parity", None)
        manifest["metrics"] = {}
        manifest["precision"] = precision
        manifest["parent"] = {
            "path": str(parent.path.resolve()),
            "model_sha256": parent.manifest["files"][MODEL_FILE]["sha256"],
        }
        manifest.update(updates)
        manifest["files"] = bundle_file_hashes(tmp)
        manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_derive_args(parent: Bundle, out_dir: Path, updates: dict[str, Any]) -> None:
    reserved = sorted(set(updates) & set(_DERIVED_KEYS))
    if reserved:
        raise UsageError(f"derive_bundle sets {', '.join(reserved)} itself; remove them from updates")
    if out_dir.resolve() == parent.path.resolve():
        raise UsageError(f"{out_dir}: a derived bundle cannot replace its parent; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder; choose another bundle path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_bundle(out_dir):
        raise UsageError(f"{out_dir}: folder is not empty and not a bundle; refusing to replace it")


def _copy_companion_files(parent: Bundle, tmp: Path) -> None:
    """Copy every file the parent lists but its model, checking each copy against the parent's hash."""
    for name, entry in parent.manifest["files"].items():
        if name == MODEL_FILE:
            continue
        data = _listed_file(parent.path, name, parent.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise ArtifactError(
                f"bundle {parent.path}: {name} sha256 mismatch: the file was altered or damaged"
            )
        atomic_write_bytes(_listed_file(tmp, name, parent.path), data)


def _check_derived_model(path: Path, input_name: str, input_dtype: str,
                         output_names: Sequence[str] = ("logits", "features")) -> None:
    """The derived model must load and keep the bundle's input (name and dtype) and outputs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises several unrelated types for a bad file
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"derived {MODEL_FILE}: ONNX Runtime cannot load it ({cause})") from e
    inputs = [i.name for i in session.get_inputs()]
    outputs = {o.name for o in session.get_outputs()}
    missing = [name for name in output_names if name not in outputs]
    if inputs != [input_name] or missing:
        raise ArtifactError(
            f"derived {MODEL_FILE}: needs input {input_name!r} and outputs {', '.join(output_names)}; "
            f"has inputs {inputs} and outputs {sorted(outputs)}"
        )
    found = session.get_inputs()[0].type
    if found != INPUT_DTYPES[input_dtype]:
        raise ArtifactError(
            f"derived {MODEL_FILE}: input {input_name!r} is {found}, but the parent bundle's model "
            f"takes {input_dtype} ({INPUT_DTYPES[input_dtype]}); a derived model must keep its input contract"
        )


def update_bundle(
    bundle: Bundle | str | os.PathLike[str],
    *,
    files: dict[str, bytes] | None = None,
    updates: dict[str, Any] | None = None,
) -> Bundle:
    """Add or replace companion files and manifest keys of a bundle in place, atomically.

    Used to attach guardrails (temperature, OOD detector, input-quality reference) to a
    bundle after export. The model is kept; every other listed file is re-checked against
    its hash while the new folder is staged beside the old one, then swapped in, so a
    failure leaves the bundle as it was. ``files`` maps a relative posix path (e.g.
    ``"guardrails/ood.npz"``) to its bytes. Returns the reloaded bundle.

    Raises:
        UsageError: a reserved manifest key in ``updates``, or an unsafe or reserved file name.
        ArtifactError: the bundle is altered or damaged.
    """
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    files, updates = dict(files or {}), dict(updates or {})
    reserved = sorted(set(updates) & set(_DERIVED_KEYS))
    if reserved:
        raise UsageError(f"update_bundle sets {', '.join(reserved)} itself; remove them from updates")
    for name in files:
        if name in (MODEL_FILE, MANIFEST_NAME):
            raise UsageError(f"update_bundle cannot replace {name}; export or derive a new bundle instead")
        _listed_file(bundle.path, name, bundle.path)  # refuses absolute paths and ``..``
    verify_files(bundle.path, bundle.manifest)
    tmp = staging_dir(bundle.path)
    try:
        for name in bundle.manifest["files"]:
            source = _listed_file(bundle.path, name, bundle.path)
            target = _listed_file(tmp, name, bundle.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        for name, data in files.items():
            atomic_write_bytes(_listed_file(tmp, name, bundle.path), data)
        manifest = copy.deepcopy(bundle.manifest)
        manifest.update(updates)
        manifest["files"] = bundle_file_hashes(tmp)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        replace_dir(tmp, bundle.path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(bundle.path, intra_op_num_threads=bundle.intra_op_num_threads)
