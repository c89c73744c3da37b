"""Post-training quantization of a bundle with ONNX Runtime: static INT8 (QDQ) and FP16.

Each variant is a new bundle (:func:`lensforge.deploy.bundle.derive_bundle`) whose ONNX
file is the one that gets evaluated, benchmarked and shipped. INT8 follows ONNX Runtime's
recipe: ``quant_pre_process`` (shape inference and graph optimisation), then
``quantize_static`` in QDQ format with per-channel int8 weights and activations
calibrated on a sample of training images. Two choices are ours:

* activations are uint8 (ORT's "U8S8"), as ORT advises for x86. Measured with ORT 1.32 on
  a 2-core AMD EPYC (Zen 4, AVX-512 VNNI), batch 1, 2 threads, median of 7 x 30 runs:
  resnet18 @224 fp32 62.9 ms, int8 u8 20.7 ms, int8 s8 49.9 ms; EfficientNet-Lite0 @224
  fp32 20.5 ms, u8 10.4 ms, s8 17.3 ms, with u8 agreeing with fp32 top-1 on 88.0% of
  photo crops against 85.5% for s8;
* the ``logits`` and ``features`` outputs stay float32: ORT would round them to 8 bits,
  coarsening calibrated probabilities and the features OOD detectors read (same speed);
* the input normalisation at the head of the graph (Cast, Mul, Add on the uint8 pixels,
  :func:`input_preprocessing_nodes`) stays float: the first convolution is quantized on
  normalised values, as it would be for a model that takes them, and the pixels are never
  re-rounded. Variants keep the parent's input contract (uint8 pixels for a version-2
  bundle): calibration, parity and ranking feed :meth:`Bundle.model_input` of the pixels.

Calibration methods, measured on the same models: ``minmax`` (default) and ``percentile``
(99.999%) are close; ``entropy`` (KL thresholds) clipped the pre-logit features hard (digits
TinyCNN 87.0% -> 82.2% accuracy where minmax keeps 87.0%) and is 5-10x slower to calibrate.

:func:`quantize_guarded` adds the loop the deployment budget needs: quantize, evaluate,
and while the accuracy drop exceeds the allowance try another calibration method, then
return the most damaging nodes to float (ranked by :func:`rank_sensitive_nodes` with
ORT's ``qdq_loss_debug``) before giving up. Torch is never imported here.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from lensforge.deploy.bundle import (
    MANIFEST_NAME,
    MODEL_FILE,
    Bundle,
    derive_bundle,
    is_bundle,
    load_bundle,
    read_manifest,
)
from lensforge.errors import ExportError, UsageError
from lensforge.utils.io import atomic_write_json, replace_dir

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "int8")
_CALIBRATION_BATCH = 16  # images per calibration run; histogram methods keep every batch in memory
_PARITY_IMAGES = 128  # calibration images the new model is compared with its parent on
_RANK_IMAGES = 32  # images rank_sensitive_nodes runs (both models, every float tensor saved)
_EXCLUDE_STEPS = (1, 3, 8, 20, 50)  # nodes returned to float on successive guarded attempts
_SAVED_SUFFIX = "_ReshapedSavedOutput"  # qdq_loss_debug's name for a saved intermediate tensor
_QUANT_INPUT_SUFFIX = "_QuantizeLinear_Input"  # ORT's name for a graph output's unrounded value
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_PREPROCESSING_OPS = ("Cast", "Mul", "Add", "Sub", "Div")  # the input normalisation export writes


@dataclass(frozen=True)
class Int8Settings:
    """How :func:`quantize_int8` quantizes; written to the bundle manifest as ``quantization``."""

    method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool = False  # 7-bit weights: only for x86 CPUs without VNNI
    excluded_nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = None  # None: every op type ORT can quantize

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(_unknown("calibration method", self.method, CALIBRATION_METHODS))
        for what, value in (("activation type", self.activation_type), ("weight type", self.weight_type)):
            if value not in ACTIVATION_TYPES:
                raise UsageError(_unknown(what, value, ACTIVATION_TYPES))


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_guarded` kept and why.

    Attributes:
        bundle: the best attempt's bundle (``out_dir``); None only if every attempt failed to run.
        accuracy: its accuracy in [0, 1] as ``evaluate`` measured it.
        drop_points: reference accuracy minus ``accuracy``, in percentage points.
        attempts: one ``{"method", "excluded_nodes", "accuracy", "drop_points"}`` per attempt
            (``"error"`` instead of the numbers when an attempt could not be made).
        accepted: the kept bundle is within the allowance.
        reason: one line for people, with the numbers.
    """

    bundle: Path | None
    accuracy: float | None
    drop_points: float | None
    attempts: list[dict[str, Any]]
    accepted: bool
    reason: str


def quantize_int8(
    bundle: Bundle | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    calibration_images: np.ndarray,
    *,
    method: str = "minmax",
    per_channel: bool = True,
    exclude_nodes: Sequence[str] = (),
    op_types: Sequence[str] | None = None,
    reduce_range: bool = False,
    activation_type: str = "uint8",
) -> Path:
    """Static INT8 quantization of a bundle into a new bundle at ``out_dir``.

    Args:
        calibration_images: uint8 (N, C, H, W) at the bundle's input size, normally a few
            hundred training images (``entropy`` and ``percentile`` hold all their
            activations in memory: keep N modest for large inputs).
        method: calibration method, one of ``CALIBRATION_METHODS`` (see the module notes).
        exclude_nodes: node names kept in float (see :func:`rank_sensitive_nodes`).
        op_types: quantize only these op types (e.g. ``["Conv"]``); None for all.
        activation_type: ``"uint8"`` (default, best on x86) or ``"int8"`` (ARM).

    Returns:
        ``out_dir``; its manifest has ``precision: "int8"``, ``quantization`` (the settings and
        ``calibration_images``) and ``parity`` (agreement with the parent on calibration images).

    Raises:
        UsageError: calibration images of the wrong dtype or shape, an unknown method or node.
        ExportError: ONNX Runtime failed to prepare or quantize the model.
    """
    settings = Int8Settings(
        method=method, per_channel=per_channel, activation_type=activation_type,
        reduce_range=reduce_range, excluded_nodes=tuple(exclude_nodes),
        op_types=tuple(op_types) if op_types is not None else None,
    )  # fmt: skip
    parent = _open_bundle(bundle)
    _check_images(calibration_images, parent)
    with tempfile.TemporaryDirectory(prefix="lensforge-quantize-") as work:
        prepared = prepare_for_quantization(parent, Path(work) / "prepared.onnx")
        return _quantize_prepared(parent, prepared, Path(out_dir), calibration_images, settings)


def prepare_for_quantization(bundle: Bundle, path: Path) -> Path:
    """ORT's ``quant_pre_process`` of the bundle's model into ``path`` (the bundle is not touched).

    Node names of the result are the ones ``exclude_nodes`` and :func:`rank_sensitive_nodes`
    use; they match the bundle's own graph unless ORT's optimiser fused nodes away.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = bundle.path / MODEL_FILE
    causes = []
    # symbolic shape inference fails on some graphs; ONNX's own shape inference then suffices for CNNs
    for skip_symbolic in (False, True):
        try:
            with _quiet():
                quant_pre_process(str(source), str(path), skip_symbolic_shape=skip_symbolic)
            return path
        except Exception as e:  # ORT's tools raise anything from deep inside onnx
            causes.append(_one_line(e))
            log.debug("quant_pre_process failed (skip_symbolic_shape=%s)", skip_symbolic, exc_info=True)
    raise ExportError(f"cannot prepare {source} for quantization: {causes[-1]}")


def _quantize_prepared(
    parent: Bundle,
    prepared: Path,
    out_dir: Path,
    images: np.ndarray,
    settings: Int8Settings,
    *,
    calibration_cache: Path | None = None,
) -> Path:
    """quantize_static on an already prepared model, then write the derived bundle.

    ``calibration_cache``: a JSON file of tensor ranges for ``settings.method`` that ORT reads
    if it exists and writes if not, so repeated attempts calibrate once (ORT >= 1.32 only;
    ignored before). Make it per method, and first with no nodes excluded.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    _check_node_names(settings.excluded_nodes, prepared)
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    cache: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lensforge-int8-") as work:
        quantized = Path(work) / "int8.onnx"
        try:
            if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
                calibration_cache = calibration_cache or Path(work) / "calibration.json"
                cache["calibration_cache_path"] = str(calibration_cache)
                if settings.method == "entropy" and not calibration_cache.exists():
                    _calibrate_entropy(prepared, images, parent, settings, calibration_cache)
            with _quiet():
                quantize_static(
                    str(prepared), str(quantized), _CalibrationReader(images, parent),
                    quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                    reduce_range=settings.reduce_range,
                    activation_type=types[settings.activation_type],
                    weight_type=types[settings.weight_type],
                    calibrate_method=_calibration_method(settings.method),
                    nodes_to_exclude=[*settings.excluded_nodes, *input_preprocessing_nodes(prepared)],
                    op_types_to_quantize=list(settings.op_types) if settings.op_types else None,
                    **cache,
                )  # fmt: skip
        except Exception as e:  # ORT raises plain ValueError/RuntimeError/onnx errors alike
            log.debug("quantize_static failed", exc_info=True)
            raise ExportError(f"cannot quantize {parent.path / MODEL_FILE}: {_one_line(e)}") from e
        model = onnx.load(str(quantized))
        keep_outputs_float(model)
        data = model.SerializeToString()
        quantized.write_bytes(data)
        updates = {
            "quantization": {**asdict(settings), "calibration_images": len(images)},
            "parity": _parity(parent, quantized, images[:_PARITY_IMAGES]),
        }
        return derive_bundle(parent, out_dir, data, precision="int8", updates=updates)


def _calibrate_entropy(
    prepared: Path, images: np.ndarray, parent: Bundle, settings: Int8Settings, cache: Path
) -> None:
    """Entropy (KL) ranges with 2048 histogram bins, written where quantize_static reads its cache.

    quantize_static builds its entropy calibrator with 128 bins for 128 quantized bins, which
    leaves one candidate threshold, the full range: the result is exactly MinMax's (checked
    with ORT 1.32; microsoft/onnxruntime#9597 and #10261). Its ``create_calibrator`` takes the
    bin counts, so we calibrate with it and hand the ranges over through the cache.
    """
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="lensforge-entropy-") as work, _quiet():
        calibrator = create_calibrator(
            str(prepared), list(settings.op_types) if settings.op_types else None,
            augmented_model_path=str(Path(work) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": 2048, "num_quantized_bins": 128},
        )  # fmt: skip
        calibrator.collect_data(_CalibrationReader(images, parent))
        save_tensors_data(calibrator.compute_data(), cache)


def input_preprocessing_nodes(model: onnx.ModelProto | str | os.PathLike[str]) -> list[str]:
    """Names of the elementwise nodes that normalise the graph input before the network proper.

    The chain of Cast, Mul, Add, Sub and Div nodes that starts at the (single) graph input,
    each reading the previous one and otherwise only constants: what export puts in front
    of the network of a version-2 bundle. Empty for a model that takes normalised floats.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    inputs = [i.name for i in graph.input if i.name not in constants]
    if len(inputs) != 1:
        return []
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    chain, tensor = [], inputs[0]
    while len(consumers.get(tensor, [])) == 1:
        node = consumers[tensor][0]
        others = [name for name in node.input if name != tensor]
        if node.op_type not in _PREPROCESSING_OPS or not all(name in constants for name in others):
            break
        chain.append(node.name)
        tensor = node.output[0]
    return chain


def module_nodes(model: onnx.ModelProto | str | os.PathLike[str], module: str) -> list[str]:
    """Names of the nodes the dynamo exporter made from ``module`` (a dotted path such as
    ``net.model.head``) and its children, read from each node's ``namespace`` metadata.

    What ``exclude_nodes`` takes to keep a part of the network in float, e.g. a detector's head.
    Empty for graphs without that metadata (the legacy exporter).
    """
    graph = (model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)).graph
    found = []
    for node in graph.node:
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        paths = [part.split(":")[0].strip() for part in namespace.split("/")]
        if any(path == module or path.startswith(module + ".") for path in paths):
            found.append(node.name)
    return found


def convert_fp16(
    bundle: Bundle | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    sample_images: np.ndarray | None = None,
) -> Path:
    """FP16 weights and compute, the parent's input and float32 outputs kept, into a new bundle at ``out_dir``.

    Uses ONNX Runtime's own converter (``onnxruntime.transformers.float16``, the code of
    onnxconverter-common), so no extra dependency. It halves the file; on CPUs without native
    fp16 arithmetic (this AVX-512 Zen 4 has none) ORT runs many fp16 ops through casts and it
    is usually *slower* than fp32: measure before shipping it for a CPU target.

    Args:
        sample_images: uint8 (N, C, H, W); when given, agreement with the parent is recorded as
            ``parity`` in the manifest.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    parent = _open_bundle(bundle)
    if sample_images is not None:
        _check_images(sample_images, parent)
    model = onnx.load(str(parent.path / MODEL_FILE))
    try:
        with _quiet():
            converted = convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:  # the converter raises plain exceptions on graphs it cannot handle
        raise ExportError(f"cannot convert {parent.path / MODEL_FILE} to fp16: {_one_line(e)}") from e
    data = converted.SerializeToString()
    updates: dict[str, Any] = {
        "quantization": {
            "method": "fp16",
            "converter": "onnxruntime.transformers.float16",
            "io_dtype": "float32",  # the outputs, kept float32 (keep_io_types)
            "input_dtype": parent.input_dtype,  # kept too: uint8 pixels, or a version-1 bundle's float32
        }
    }
    if sample_images is not None:
        with tempfile.TemporaryDirectory(prefix="lensforge-fp16-") as work:
            path = Path(work) / "fp16.onnx"
            path.write_bytes(data)
            updates["parity"] = _parity(parent, path, sample_images[:_PARITY_IMAGES])
    return derive_bundle(parent, out_dir, data, precision="fp16", updates=updates)


def keep_outputs_float(model: onnx.ModelProto) -> None:
    """Take the Q/DQ pair off every graph output in place, so outputs leave the model unrounded.

    ORT's QDQ quantizer renames a graph output's float value ``X_QuantizeLinear_Input`` and
    makes ``X`` the dequantized copy. We give the float value its name back; nodes that read
    ``X`` inside the graph keep reading the rounded copy, now ``X_DequantizeLinear_Output``.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    names = {t for node in graph.node for t in (*node.input, *node.output)}
    graph_inputs = {i.name for i in graph.input}
    for output in graph.output:
        dq = producers.get(output.name)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in graph_inputs:
            continue  # not a rounded output, or one that is the model's input passed through
        rounded = _unused_name(f"{output.name}_DequantizeLinear_Output", names)
        _rename_tensor(graph, output.name, rounded)
        _rename_tensor(graph, q.input[0], output.name)
    _drop_unused_qdq(graph)


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor in node inputs, outputs and value_info (graph outputs keep their names)."""
    for node in graph.node:
        node.input[:] = [new if t == old else t for t in node.input]
        node.output[:] = [new if t == old else t for t in node.output]
    for info in graph.value_info:
        if info.name == old:
            info.name = new


def _drop_unused_qdq(graph: onnx.GraphProto) -> None:
    """Remove Q/DQ nodes nobody reads any more, then the scales and zero points they used."""
    while True:
        used = {t for node in graph.node for t in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in _QDQ_OPS and not any(t in used for t in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {t for node in graph.node for t in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _unused_name(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    taken.add(candidate)
    return candidate


def rank_sensitive_nodes(
    fp32_bundle: Bundle | str | os.PathLike[str],
    int8_model: Bundle | str | os.PathLike[str],
    images: np.ndarray,
    *,
    prepared: Path | None = None,
) -> list[tuple[str, float]]:
    """Quantized nodes ordered by the accuracy they cost, worst first: ``[(node_name, loss_db)]``.

    Both models run on ``images`` (the first 32) with every float tensor saved (ORT's
    ``qdq_loss_debug``). For each tensor the int8 model computes, the signal-to-quantization-
    noise ratio (SQNR, dB) against the float model's tensor of the same name is measured. A
    node's loss is the SQNR of its least accurate input minus the SQNR of its output as the
    next node sees it: the precision lost *in* that node (its weights, its arithmetic and
    its output rounding), not the error it inherits, so returning the first nodes of the
    list to float recovers the most. Names are those of the prepared float model, ready for
    ``exclude_nodes``.

    Args:
        int8_model: an INT8 bundle (or its ``model.onnx``) quantized from ``fp32_bundle``.
        images: uint8 (N, C, H, W) at the bundle's input size.
        prepared: the model :func:`prepare_for_quantization` made, if at hand (saves a step).
    """
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors

    fp32 = _open_bundle(fp32_bundle)
    _check_images(images, fp32)
    int8_path = _model_path(int8_model)
    qdq_graph = onnx.load(str(int8_path), load_external_data=False).graph
    with tempfile.TemporaryDirectory(prefix="lensforge-rank-") as work_dir:
        work = Path(work_dir)
        float_path = prepared or prepare_for_quantization(fp32, work / "prepared.onnx")
        with _quiet():
            modify_model_output_intermediate_tensors(str(float_path), str(work / "float-saved.onnx"))
            modify_model_output_intermediate_tensors(str(int8_path), str(work / "int8-saved.onnx"))
        node_io = _quantized_node_io(qdq_graph)
        pairs = {pair for ins, out in node_io.values() for pair in (*ins, out)}
        sqnr = _pair_sqnr(work / "float-saved.onnx", work / "int8-saved.onnx", pairs,
                          fp32.model_input(images[:_RANK_IMAGES]))  # fmt: skip
        float_nodes = {node.name for node in onnx.load(str(float_path), load_external_data=False).graph.node}
    losses = []
    for name, (ins, out) in node_io.items():
        known = [sqnr[pair] for pair in ins if pair in sqnr]
        if name in float_nodes and known and out in sqnr:
            losses.append((name, round(min(known) - sqnr[out], 3)))
    return sorted(losses, key=lambda item: -item[1])


def _quantized_node_io(
    graph: onnx.GraphProto,
) -> dict[str, tuple[list[tuple[str, str]], tuple[str, str]]]:
    """``{node: ([(float input, input as read)], (float output, output as the next node reads it))}``.

    Only nodes that read a dequantized tensor (the quantized ones). Tensor pairs name the
    float model's tensor and the int8 model's tensor holding the same value.
    """
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    initializers = {i.name for i in graph.initializer}

    def float_name(tensor: str) -> str | None:
        node = producers.get(tensor)
        if node is not None and node.op_type == "DequantizeLinear":
            q = producers.get(node.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                return None  # a dequantized weight: part of its node, not an activation
            tensor = q.input[0]
        return tensor.removesuffix(_QUANT_INPUT_SUFFIX)

    def as_read(tensor: str) -> str:
        """The tensor holding ``tensor``'s value as consumers see it (after its Q/DQ, if any)."""
        for q in consumers.get(tensor, []):
            if q.op_type == "QuantizeLinear":
                for dq in consumers.get(q.output[0], []):
                    if dq.op_type == "DequantizeLinear":
                        return dq.output[0]
        return tensor

    result = {}
    for node in graph.node:
        if node.op_type in _QDQ_OPS or not node.output:
            continue
        dequantized = [t for t in node.input if t in producers and producers[t].op_type == "DequantizeLinear"]
        if not dequantized:
            continue
        inputs = [(name, t) for t in node.input if t and t not in initializers and (name := float_name(t))]
        output = node.output[0]
        result[node.name] = (inputs, (output.removesuffix(_QUANT_INPUT_SUFFIX), as_read(output)))
    return result


def _pair_sqnr(
    float_saved: Path, int8_saved: Path, pairs: set[tuple[str, str]], batch: np.ndarray
) -> dict[tuple[str, str], float]:
    """SQNR in dB of each (float tensor, int8 tensor) pair, summed over ``batch`` run in chunks."""
    sessions = [_session(path, optimize=False) for path in (float_saved, int8_saved)]
    saved = [{o.name.removesuffix(_SAVED_SUFFIX) for o in s.get_outputs() if o.name.endswith(_SAVED_SUFFIX)}
             for s in sessions]  # fmt: skip
    if not saved[0] or not saved[1]:
        raise ExportError("onnxruntime's qdq_loss_debug saved no tensors (did its naming change?)")
    pairs = {(f, q) for f, q in pairs if f in saved[0] and q in saved[1]}
    float_names = sorted({f for f, _ in pairs})
    int8_names = sorted({q for _, q in pairs})
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    input_names = [s.get_inputs()[0].name for s in sessions]
    for start in range(0, len(batch), _CALIBRATION_BATCH):
        chunk = batch[start : start + _CALIBRATION_BATCH]
        float_out = dict(zip(float_names, sessions[0].run([n + _SAVED_SUFFIX for n in float_names],
                                                          {input_names[0]: chunk})))  # fmt: skip
        int8_out = dict(zip(int8_names, sessions[1].run([n + _SAVED_SUFFIX for n in int8_names],
                                                        {input_names[1]: chunk})))  # fmt: skip
        for pair in pairs:
            reference, quantized = float_out[pair[0]], int8_out[pair[1]]
            if reference.shape != quantized.shape:
                continue
            signal[pair] += float(np.sum(np.square(reference, dtype=np.float64)))
            noise[pair] += float(np.sum(np.square(reference - quantized, dtype=np.float64)))
    tiny = np.finfo(np.float64).eps
    return {pair: 10 * math.log10(max(signal[pair], tiny) / max(noise[pair], tiny)) for pair in pairs}


def quantize_guarded(
    bundle: Bundle | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    calibration_images: np.ndarray,
    evaluate: Callable[[Path], float],
    *,
    max_drop_points: float,
    reference_accuracy: float,
    method: str = "minmax",
    max_attempts: int = 4,
    per_channel: bool = True,
    activation_type: str = "uint8",
) -> QuantizeResult:
    """INT8 within an accuracy allowance: quantize, evaluate, and repair before giving up.

    Attempt 1 uses ``method``; attempt 2 another calibration method (``percentile`` after
    ``minmax``, else ``minmax``); later attempts take the better of the two and return the
    1, 3, 8, 20, 50 most damaging nodes (:func:`rank_sensitive_nodes`) to float. It stops at
    the first attempt within ``max_drop_points``. The kept attempt (the passing one, else the
    most accurate) is moved to ``out_dir`` even when none passes, with ``quantization.guard``
    in its manifest saying whether it was accepted, so the caller can report the numbers.

    Args:
        evaluate: accuracy in [0, 1] of the bundle at a path (e.g. on the test split through
            ONNX Runtime); the path is temporary, do not keep it.
        max_drop_points: allowed accuracy drop in percentage points (1.0 = one point).
        reference_accuracy: the fp32 bundle's accuracy in [0, 1] on the same data.
    """
    Int8Settings(method=method, activation_type=activation_type)  # validates both
    parent = _open_bundle(bundle)
    _check_images(calibration_images, parent)
    out_dir = Path(out_dir)
    _check_guard_args(parent, out_dir, max_attempts, reference_accuracy)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=out_dir.parent))
    try:
        prepared = prepare_for_quantization(parent, work / "prepared.onnx")
        guard = _Guard(parent, prepared, work, calibration_images, evaluate, per_channel, activation_type,
                       max_drop_points=max_drop_points, reference_accuracy=reference_accuracy)  # fmt: skip
        for step, plan in enumerate(guard.plans(method), start=1):
            if guard.run(step, *plan) or step >= max_attempts:
                break
        return guard.finish(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _Guard:
    """The attempts of one :func:`quantize_guarded` call (kept out of it to keep it readable)."""

    def __init__(self, parent: Bundle, prepared: Path, work: Path, images: np.ndarray,
                 evaluate: Callable[[Path], float], per_channel: bool, activation_type: str, *,
                 max_drop_points: float, reference_accuracy: float) -> None:  # fmt: skip
        self.parent, self.prepared, self.work, self.images = parent, prepared, work, images
        self.evaluate, self.per_channel, self.activation_type = evaluate, per_channel, activation_type
        self.max_drop_points, self.reference_accuracy = max_drop_points, reference_accuracy
        self.attempts: list[dict[str, Any]] = []
        self.paths: list[Path | None] = []
        self.rank_error: str | None = None

    def plans(self, method: str) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(method, nodes kept float) for each attempt, in order."""
        second = "percentile" if method == "minmax" else "minmax"
        yield method, ()
        yield second, ()
        base = self._best()
        if base is None:
            return
        try:
            ranked = [name for name, _ in rank_sensitive_nodes(
                self.parent, self.paths[base], self.images, prepared=self.prepared)]  # fmt: skip
        except Exception as e:  # ranking is a repair aid: its failure ends the repairs, not the call
            log.debug("rank_sensitive_nodes failed", exc_info=True)
            self.rank_error = _one_line(e)
            return
        previous = 0
        for k in _EXCLUDE_STEPS:
            k = min(k, len(ranked))
            if k <= previous:
                return
            previous = k
            yield self.attempts[base]["method"], tuple(ranked[:k])

    def run(self, step: int, method: str, excluded: tuple[str, ...]) -> bool:
        """One attempt; True when it is within the allowance."""
        record: dict[str, Any] = {"method": method, "excluded_nodes": list(excluded)}
        settings = Int8Settings(method=method, per_channel=self.per_channel,
                                activation_type=self.activation_type, excluded_nodes=excluded)  # fmt: skip
        path = self.work / f"attempt-{step}"
        cache = self.work / f"calibration-{method}.json"  # each method calibrates once
        try:
            _quantize_prepared(self.parent, self.prepared, path, self.images, settings, calibration_cache=cache)
        except ExportError as e:
            record["error"] = str(e)
            self.attempts.append(record)
            self.paths.append(None)
            return False
        accuracy = float(self.evaluate(path))
        record["accuracy"] = accuracy
        record["drop_points"] = round((self.reference_accuracy - accuracy) * 100, 4)
        self.attempts.append(record)
        self.paths.append(path)
        log.info("int8 attempt %d (%s, %d nodes float): accuracy %.4f", step, method, len(excluded), accuracy)
        return record["drop_points"] <= self.max_drop_points

    def _best(self) -> int | None:
        """Index of the most accurate attempt that ran (the earliest among equals)."""
        ran = [i for i, path in enumerate(self.paths) if path is not None]
        return max(ran, key=lambda i: (self.attempts[i]["accuracy"], -i)) if ran else None

    def finish(self, out_dir: Path) -> QuantizeResult:
        last = self.attempts[-1]
        accepted = "error" not in last and last["drop_points"] <= self.max_drop_points
        keep = len(self.attempts) - 1 if accepted else self._best()
        if keep is None:
            errors = "; ".join(a["error"] for a in self.attempts)
            return QuantizeResult(None, None, None, self.attempts, False, f"every int8 attempt failed: {errors}")
        chosen, path = self.attempts[keep], self.paths[keep]
        assert path is not None
        reason = self._reason(accepted, keep)
        self._record_guard(path, accepted, keep, reason)
        replace_dir(path, out_dir)
        return QuantizeResult(out_dir, chosen["accuracy"], chosen["drop_points"], self.attempts, accepted, reason)

    def _reason(self, accepted: bool, keep: int) -> str:
        chosen = self.attempts[keep]
        what = f"int8 ({chosen['method']} calibration, {len(chosen['excluded_nodes'])} nodes kept float)"
        numbers = (f"{chosen['accuracy']:.2%} vs fp32 {self.reference_accuracy:.2%}: "
                   f"{chosen['drop_points']:.2f} points lost, {self.max_drop_points:.2f} allowed")  # fmt: skip
        if accepted:
            return f"{what} accepted at attempt {keep + 1}: {numbers}"
        note = f"; ranking nodes failed ({self.rank_error})" if self.rank_error else ""
        return (f"rejected: no int8 attempt of {len(self.attempts)} stayed within the allowance; "
                f"best was {what} at {numbers}{note}")  # fmt: skip

    def _record_guard(self, path: Path, accepted: bool, keep: int, reason: str) -> None:
        """Write the guard's verdict into the kept bundle's manifest (not a hashed file)."""
        manifest_path = path / MANIFEST_NAME
        manifest = read_manifest(path)
        manifest["quantization"]["guard"] = {
            "accepted": accepted, "reason": reason, "reference_accuracy": self.reference_accuracy,
            "max_drop_points": self.max_drop_points, "kept_attempt": keep + 1, "attempts": self.attempts,
        }  # fmt: skip
        atomic_write_json(manifest_path, manifest)


def _check_guard_args(parent: Bundle, out_dir: Path, max_attempts: int, reference_accuracy: float) -> None:
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise UsageError(f"max_attempts must be a positive integer, not {max_attempts!r}")
    if not 0.0 <= reference_accuracy <= 1.0:
        raise UsageError(f"reference_accuracy is a fraction in [0, 1], not {reference_accuracy!r}")
    if out_dir.resolve() == parent.path.resolve():
        raise UsageError(f"{out_dir}: the int8 bundle cannot replace its fp32 parent; choose another folder")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not is_bundle(out_dir))):
        raise UsageError(f"{out_dir}: exists and is not a bundle; refusing to replace it")


class _CalibrationReader:
    """ORT ``CalibrationDataReader``: batches of the calibration images as the model takes them, then None.

    uint8 pixels for a version-2 bundle (the graph normalises them), normalised float32 for a
    version-1 one (:meth:`Bundle.model_input`).

    Duck-typed (ORT checks for ``get_next``) so that importing this module stays light.
    """

    def __init__(self, images: np.ndarray, bundle: Bundle) -> None:
        self.images, self.bundle = images, bundle
        # equal batches: ORT's histogram calibrators (entropy, percentile) stack the batches
        # with np.asarray and fail on a shorter last one (microsoft/onnxruntime#18792)
        self.batch_size = max(b for b in range(1, _CALIBRATION_BATCH + 1) if len(images) % b == 0)
        self.start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start : self.start + self.batch_size]
        self.start += self.batch_size
        return {self.bundle.input_name: self.bundle.model_input(batch)}



def _parity(parent: Bundle, model_path: Path, images: np.ndarray) -> dict[str, Any]:
    """Agreement of the new model with its parent on ``images`` (recorded in the manifest).

    Compared on the bundle's first output: a classifier's logits, a detector's class logits
    (its "top-1" is then the best class of each anchor point).
    """
    ours, theirs = [], []
    first = parent.output_names[0]
    try:
        session = _session(model_path)
        for start in range(0, len(images), _CALIBRATION_BATCH):
            pixels = images[start : start + _CALIBRATION_BATCH]
            ours.append(session.run([first], {parent.input_name: parent.model_input(pixels)})[0])
            theirs.append(parent.outputs_uint8(pixels)[first])
    except Exception as e:  # ORT has no common base exception
        raise ExportError(f"the converted model of {parent.path} does not run in ONNX Runtime: {_one_line(e)}") from e
    reference, derived = np.concatenate(theirs), np.concatenate(ours)
    noise = float(np.sum(np.square(reference - derived, dtype=np.float64)))
    signal = float(np.sum(np.square(reference, dtype=np.float64)))
    return {
        "reference": "parent",
        "n_images": len(images),
        "top1_agreement": float(np.mean(reference.argmax(-1) == derived.argmax(-1))),
        "max_abs_diff_logits": float(np.abs(reference - derived).max()),
        "logits_sqnr_db": round(10 * math.log10(max(signal, 1e-30) / max(noise, 1e-30)), 2),
    }


def _session(path: Path, *, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:  # keep every saved tensor as the graph names it (as qdq_loss_debug does)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _open_bundle(bundle: Bundle | str | os.PathLike[str]) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


def _model_path(model: Bundle | str | os.PathLike[str]) -> Path:
    if isinstance(model, Bundle):
        return model.path / MODEL_FILE
    path = Path(model)
    if path.is_dir():
        return load_bundle(path).path / MODEL_FILE
    if not path.is_file():
        raise UsageError(f"{path}: no such ONNX file or bundle")
    return path


def _check_images(images: np.ndarray, bundle: Bundle) -> None:
    """uint8 (N >= 1, C, H, W) matching the bundle's preprocessing, else a UsageError with both shapes."""
    pre = bundle.preprocess
    expected = (pre.channels, *pre.input_size)
    shown = f"(N, {', '.join(map(str, expected))})"
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = getattr(images, "dtype", type(images).__name__)
        raise UsageError(f"calibration images must be a uint8 array of shape {shown}, not {got}")
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or len(images) == 0:
        raise UsageError(
            f"calibration images for bundle {bundle.path} must have shape {shown} with N >= 1, "
            f"got {tuple(images.shape)}"
        )


def _check_node_names(names: Sequence[str], model_path: Path) -> None:
    if not names:
        return
    known = [node.name for node in onnx.load(str(model_path), load_external_data=False).graph.node]
    unknown = [name for name in names if name not in set(known)]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], known, n=3)
        also = f" (did you mean {', '.join(hint)}?)" if hint else ""
        raise UsageError(f"exclude_nodes: no node named {', '.join(map(repr, unknown[:5]))} in the model{also}")


def _calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]  # fmt: skip


def _unknown(what: str, value: Any, choices: Sequence[str]) -> str:
    hint = difflib.get_close_matches(str(value), choices, n=1)
    also = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {what} {value!r}{also}; choose one of {', '.join(choices)}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantization tools print progress to stdout; keep it off the console."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return line if len(line) <= 240 else line[:237] + "..."
