"""Export a timm-style model to ONNX, check it against PyTorch, and write a bundle.

The exported graph takes raw uint8 pixels (N, C, H, W) at the bundle's input size and
normalises them itself (:class:`PixelInputModel`: Cast, Mul, Add, then the network), so
a user of the bundle outside lensforge needs only the resize (bundle format version 2).
The dynamo exporter (``torch.export`` based) is tried first: it is the maintained
path, and in our measurements gives the same or faster ONNX Runtime latency; the
legacy TorchScript exporter is used only when dynamo fails, and the manifest says
which one made the file. Exporter chatter is kept off the console; failures come
back as one-line :class:`ExportError` messages.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lensforge.data.preprocess import Preprocess
from lensforge.deploy.bundle import (
    BUNDLE_FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODEL_FILE,
    bundle_file_hashes,
    is_bundle,
)
from lensforge.errors import ExportError, UsageError
from lensforge.models.normalize import Normalize
from lensforge.utils.io import atomic_write_json, replace_dir, staging_dir
from lensforge.utils.progress import StepProgress

log = logging.getLogger(__name__)
OUTPUT_NAMES = ("logits", "features")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LogitsAndFeatures(nn.Module):
    """Wrap a timm-style model so ``forward`` returns ``(logits, penultimate features)``.

    The classification task's export module. Every task's export module (see
    :meth:`lensforge.tasks.Task.torch`) takes the normalised float input and returns a tuple
    named by its ``output_names``.
    """

    output_names = OUTPUT_NAMES

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for method in ("forward_features", "forward_head", "get_classifier"):
            if not callable(getattr(model, method, None)):
                raise UsageError(
                    f"{type(model).__name__} has no {method}(): export needs timm's model interface"
                )
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(features), features

    def manifest_entries(self, x: torch.Tensor, outputs: dict[str, torch.Tensor],
                         class_names: Sequence[str]) -> dict[str, Any]:
        """Check the outputs on a normalised probe batch ``x``; the task's own manifest entries (none)."""
        direct = self.model(x)
        logits = outputs["logits"]
        if (not isinstance(direct, torch.Tensor) or direct.shape != logits.shape
                or not torch.allclose(direct, logits, rtol=1e-4, atol=1e-5)):
            raise ExportError(
                f"{type(self.model).__name__}: get_classifier()(forward_head(..., pre_logits=True)) "
                "does not reproduce model(x); cannot export logits and features together")
        if tuple(logits.shape[1:]) != (len(class_names),):
            raise UsageError(f"the model outputs {tuple(logits.shape[1:])} logits but {len(class_names)} "
                             "class names were given")
        return {}

    @staticmethod
    def parity(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], atol: float) -> dict[str, Any]:
        """PyTorch against ONNX Runtime: logits within ``atol``, and how often the top class agrees."""
        diff_logits = float(np.abs(ours["logits"] - theirs["logits"]).max())
        result = {
            "max_abs_diff_logits": diff_logits,
            "max_abs_diff_features": float(np.abs(ours["features"] - theirs["features"]).max()),
            "top1_agreement": float(np.mean(ours["logits"].argmax(1) == theirs["logits"].argmax(1))),
        }
        if not diff_logits <= atol:  # also catches NaN
            raise ExportError(f"ONNX logits differ from PyTorch by {_short(diff_logits)} (> atol {_short(atol)}) "
                              f"on {len(ours['logits'])} validation images")
        return result


class PixelInputModel(nn.Module):
    """What a bundle's ``model.onnx`` computes: uint8 pixels (N, C, H, W) -> (logits, features).

    The normalisation (:class:`~lensforge.models.normalize.Normalize`) sits in front of the
    network as its own Cast, Mul and Add nodes, not folded into the first convolution: with
    zero padding, folding would change the border outputs.
    """

    def __init__(self, model: nn.Module, pre: Preprocess) -> None:
        super().__init__()
        self.net = export_module(model)
        device = next((p.device for p in self.net.parameters()), torch.device("cpu"))
        self.normalize = Normalize(pre.mean, pre.std).to(device)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net(self.normalize(pixels))


def export_module(model: nn.Module) -> nn.Module:
    """``model`` itself when it is a task's export module (it has ``output_names``), else a classifier's."""
    return model if hasattr(model, "output_names") else LogitsAndFeatures(model)


def output_names(model: nn.Module) -> tuple[str, ...]:
    return tuple(export_module(model).output_names)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx_result` made and how (recorded in the bundle manifest)."""

    path: Path
    dynamo: bool
    opset: int
    seconds: float
    fallback_reason: str | None = None  # why dynamo failed, when the legacy exporter was used


def export_onnx(
    model: nn.Module, pre: Preprocess, path: str | os.PathLike[str], *, opset: int | None = None
) -> Path:
    """Export ``model`` to one self-contained ONNX file with a dynamic batch axis; returns its path.

    Input "input" (uint8 pixels, N x C x H x W, normalised inside the graph with ``pre``'s
    mean and std); outputs "logits" and "features" (float32).
    """
    return export_onnx_result(model, pre, path, opset=opset).path


def export_onnx_result(
    model: nn.Module,
    pre: Preprocess,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamo: bool | None = None,
) -> ExportResult:
    """Like :func:`export_onnx`, also saying which exporter and opset were used.

    Args:
        dynamo: None tries the dynamo exporter, then the legacy one if it fails;
            True or False forces one.

    Raises:
        ExportError: every exporter tried failed (one-line cause of each).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = model if isinstance(model, PixelInputModel) else PixelInputModel(model, pre)
    tries = [True, False] if dynamo is None else [dynamo]
    causes: list[str] = []
    for use_dynamo in tries:
        start = time.perf_counter()
        try:
            _export_to(wrapper, pre, path, dynamo=use_dynamo, opset=opset)
        except Exception as e:  # the exporters raise anything from deep inside torch
            causes.append(f"{_exporter_name(use_dynamo)} exporter: {_one_line_cause(e)}")
            log.debug("ONNX export with %s failed", _exporter_name(use_dynamo), exc_info=True)
            continue
        seconds = time.perf_counter() - start
        fallback = causes[0] if causes else None
        if fallback:
            log.warning("dynamo export failed, used the legacy exporter (%s)", fallback)
        return ExportResult(
            path=path,
            dynamo=use_dynamo,
            opset=_read_opset(path),
            seconds=seconds,
            fallback_reason=fallback,
        )
    inner = getattr(wrapper.net, "model", wrapper.net)
    raise ExportError(f"cannot export {type(inner).__name__} to ONNX: {'; '.join(causes)}")


def _export_to(
    wrapper: PixelInputModel, pre: Preprocess, path: Path, *, dynamo: bool, opset: int | None
) -> None:
    """One export attempt into a temp file, renamed over ``path`` only when complete."""
    device = next((p.device for p in wrapper.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    # batch 2, not 1: exporters may specialise a size-1 dimension to a constant
    shape = (2, pre.channels, *pre.input_size)
    example = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).to(device)
    names = output_names(wrapper.net)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; the model ships to others
    try:
        with _eval_mode(wrapper), _quiet_exporter():
            if dynamo:
                torch.onnx.export(
                    wrapper, (example,), str(tmp), dynamo=True, external_data=False,
                    input_names=["input"], output_names=list(names), opset_version=opset,
                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                )  # fmt: skip
            else:
                axes = {name: {0: "batch"} for name in ("input", *names)}
                torch.onnx.export(
                    wrapper, (example,), str(tmp), dynamo=False, input_names=["input"],
                    output_names=list(names), opset_version=opset, dynamic_axes=axes,
                )  # fmt: skip
        if Path(f"{tmp}.data").exists():
            raise RuntimeError("the exporter wrote external weights (.onnx.data); model over 2 GB?")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.data").unlink(missing_ok=True)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside, each submodule's own train/eval flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Swallow exporter prints, warnings and logs, including C++ writes to file descriptors 1 and 2."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    saved: list[int] = []
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            saved = [os.dup(1), os.dup(2)]
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
        except OSError:  # no usable fds (embedded interpreters): Python-level silence only
            saved = []
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                yield
        finally:
            for stream in (sys.__stdout__, sys.__stderr__):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, saved_fd in zip((1, 2), saved):
                os.dup2(saved_fd, fd)
                os.close(saved_fd)


def _one_line_cause(error: BaseException) -> str:
    """The root cause of an exporter error as one short line (exporters nest and colour theirs)."""
    root, seen = error, {id(error)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    text = _ANSI.sub("", str(root)).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = f"{type(root).__name__}: {first}" if first else type(root).__name__
    return line if len(line) <= 240 else line[:237] + "..."


def _exporter_name(dynamo: bool) -> str:
    return "dynamo" if dynamo else "legacy"


def _read_opset(path: Path) -> int:
    import onnx  # only needed here; keeps the module import light

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike[str],
    images_uint8: np.ndarray,
    pre: Preprocess,
    *,
    atol: float = 1e-3,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Run PyTorch and ONNX Runtime on the same images and compare their outputs.

    PyTorch runs ``model`` on the images normalised by :class:`~lensforge.models.normalize.Normalize`;
    ONNX Runtime runs the file on the uint8 images themselves, as a bundle is used, so the
    normalisation inside the graph is checked too. The first image runs alone and the rest
    in batches of ``batch_size``, so a batch axis that is not really dynamic fails here
    rather than in production. What must agree is the task's rule (the export module's
    ``parity``): for a classifier, logits within ``atol``.

    Returns:
        the rule's figures (a classifier: "max_abs_diff_logits", "max_abs_diff_features",
        "top1_agreement") plus "atol" and "n_images".

    Raises:
        ExportError: ONNX Runtime cannot run the file, or the outputs disagree.
    """
    _check_images(images_uint8, pre)
    net = export_module(model)
    torch_out = _torch_outputs(net, images_uint8, pre, batch_size)
    onnx_out = _onnx_outputs(Path(onnx_path), images_uint8, batch_size, tuple(net.output_names))
    for name, ours in torch_out.items():
        if ours.shape != onnx_out[name].shape:
            raise ExportError(
                f"ONNX {name} have shape {onnx_out[name].shape}, PyTorch {ours.shape} ({onnx_path})"
            )
    return {**net.parity(torch_out, onnx_out, atol), "atol": atol, "n_images": len(images_uint8)}


def _check_images(images: np.ndarray, pre: Preprocess) -> None:
    expected = (pre.channels, *pre.input_size)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise UsageError(
            f"sample images must be a uint8 array, not {getattr(images, 'dtype', type(images))}"
        )
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or len(images) == 0:
        raise UsageError(
            f"sample images must have shape (N >= 1, {', '.join(map(str, expected))}) "
            f"to match the preprocessing, not {images.shape}"
        )


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    yield slice(0, 1)
    for start in range(1, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _torch_outputs(net: nn.Module, images: np.ndarray, pre: Preprocess, batch_size: int) -> dict[str, np.ndarray]:
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    normalize = Normalize(pre.mean, pre.std).to(device)
    parts: list[tuple[torch.Tensor, ...]] = []
    with _eval_mode(net), torch.inference_mode():
        for part in _batches(len(images), batch_size):
            parts.append(net(normalize(torch.from_numpy(images[part]).to(device))))
    return {name: np.concatenate([p[i].float().cpu().numpy() for p in parts])
            for i, name in enumerate(net.output_names)}


def _onnx_outputs(path: Path, images: np.ndarray, batch_size: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    parts = []
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for part in _batches(len(images), batch_size):
            parts.append(session.run(list(names), {"input": np.ascontiguousarray(images[part])}))
    except Exception as e:  # ORT has no common base exception
        raise ExportError(f"ONNX Runtime cannot run {path}: {_one_line_cause(e)}") from e
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


def _short(x: float) -> str:
    """3.2e-2 rather than 0.032 or 3.2e-02."""
    if x == 0 or not np.isfinite(x):
        return str(x)
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def write_bundle(
    model: nn.Module,
    pre: Preprocess,
    class_names: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    model_name: str,
    sample_images: np.ndarray,
    task: str = "classification",
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    atol: float = 1e-3,
    opset: int | None = None,
    show_progress: bool = False,
) -> Path:
    """Export, check parity on ``sample_images`` and write a verified bundle folder atomically.

    The bundle is built in a hidden sibling ``.bundle.tmp-*`` folder and moved into
    place only when complete; on any failure the temp folder is removed and an
    existing bundle at ``out_dir`` is left untouched. ``show_progress`` shows a bar over
    the three steps (ONNX export, parity check, manifest) on stderr.
    """
    out_dir = Path(out_dir)
    class_names = _check_bundle_args(out_dir, class_names, sample_images, pre)
    wrapper = export_module(model)
    dims, entries = _probe(wrapper, sample_images[:2], pre, class_names)
    tmp = staging_dir(out_dir)
    try:
        with StepProgress("export", 3, enabled=show_progress) as advance:
            log.info("exporting %s to ONNX", model_name)
            exported = export_onnx_result(wrapper, pre, tmp / MODEL_FILE, opset=opset)
            advance("parity check")
            log.info("checking ONNX against PyTorch on %d images", len(sample_images))
            parity = check_parity(wrapper, exported.path, sample_images, pre, atol=atol)
            advance("manifest")
            manifest = _manifest(
                task=task, model_name=model_name, class_names=class_names, pre=pre,
                dims=dims, exported=exported, parity=parity, metrics=metrics, extra=extra,
            )  # fmt: skip
            manifest.update(entries)  # the task's own entries, e.g. a detector's box decoding
            manifest["files"] = bundle_file_hashes(tmp)
            atomic_write_json(tmp / MANIFEST_NAME, manifest)
            replace_dir(tmp, out_dir)
            advance("done")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle written to %s", out_dir)
    return out_dir


def _check_bundle_args(
    out_dir: Path, class_names: Sequence[str], sample_images: np.ndarray, pre: Preprocess
) -> list[str]:
    """Fail fast (before a slow export) on arguments that cannot make a valid bundle."""
    names = list(class_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise UsageError("class_names must be a non-empty list of non-empty strings")
    if len(set(names)) != len(names):
        raise UsageError(
            f"class_names has duplicates: {sorted({n for n in names if names.count(n) > 1})}"
        )
    _check_images(sample_images, pre)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder; choose another bundle path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_bundle(out_dir):
        raise UsageError(f"{out_dir}: folder is not empty and not a bundle; refusing to replace it")
    return names


def _probe(net: nn.Module, images: np.ndarray, pre: Preprocess, class_names: Sequence[str]
           ) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Per-image shape of each output, and the task's manifest entries (its export module checks the outputs)."""
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    x = Normalize(pre.mean, pre.std).to(device)(torch.from_numpy(images).to(device))
    with _eval_mode(net), torch.inference_mode():
        outputs = dict(zip(net.output_names, net(x)))
        entries = net.manifest_entries(x, outputs, class_names)
    return {name: tuple(value.shape[1:]) for name, value in outputs.items()}, entries


def _manifest(
    *,
    task: str,
    model_name: str,
    class_names: list[str],
    pre: Preprocess,
    dims: dict[str, tuple[int, ...]],
    exported: ExportResult,
    parity: dict[str, Any],
    metrics: dict[str, Any] | None,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "task": task,
        "model": model_name,
        "class_names": class_names,
        "num_classes": len(class_names),
        "preprocess": pre.to_dict(),
        "inputs": [
            # raw pixels, channel order RGB (or L); the graph normalises them (format_version 2)
            {"name": "input", "shape": ["batch", pre.channels, *pre.input_size], "dtype": "uint8"}
        ],
        "outputs": [{"name": name, "shape": ["batch", *shape]} for name, shape in dims.items()],
        "exporter": {
            "dynamo": exported.dynamo,
            "opset": exported.opset,
            "fallback_reason": exported.fallback_reason,
        },
        "parity": parity,
        "metrics": metrics or {},
        "temperature": 1.0,
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        manifest["extra"] = extra
    return manifest


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in ("lensforge", "torch", "onnx", "onnxruntime", "timm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
