"""``lensforge bench``: latency, throughput, memory and hardware utilisation, backend by backend.

:func:`benchmark` runs the same random uint8 images, with the same thread count, through
PyTorch eager (from the run folder), ONNX Runtime and OpenVINO (both on the
bundle's ``model.onnx``, the file that ships) and reports them side by side:
latency percentiles and images/s after warm-up, the peak resident memory of each
backend, achieved GFLOP/s and their share of this CPU's estimated peak
(:mod:`lensforge.utils.hardware`), and how far each backend's logits are from
the first one's. Torch is imported only for the PyTorch backend and for counting
FLOPs of a run's model, so a bundle-only host can bench ONNX Runtime.

Timing never decides a test: the numbers vary up to 2x on shared machines, so
compare backends measured side by side in one report, not across reports.
"""

from __future__ import annotations

import difflib
import gc
import importlib.util
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lensforge.artifacts import RUN_FILE
from lensforge.deploy.bundle import MODEL_FILE, Bundle, load_bundle
from lensforge.errors import ArtifactError, UsageError
from lensforge.registry import Registry
from lensforge.utils.hardware import CpuInfo, detect_cpu
from lensforge.utils.io import atomic_write_json

if TYPE_CHECKING:
    from rich.table import Table

MAX_BATCH = 4096
WEIGHTS_FILE = "model.safetensors"
OPENVINO_HINT = "OpenVINO is not installed: pip install 'lensforge[openvino]'"
_MB = 1024 * 1024


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ModelInfo:
    """What is being benchmarked: size on disk, parameters and work per image.

    Attributes:
        size_mb: ``model.onnx`` of the bundle (what ships); None without a bundle.
        weights_size_mb: the run's PyTorch weights (``model.safetensors``); None for a bare bundle.
        flops_source: "torch.utils.flop_counter", "manifest" or "onnx graph".
    """

    name: str | None
    input_shape: tuple[int, int, int]
    size_mb: float | None
    weights_size_mb: float | None
    params: int | None
    flops_per_image: int | None
    macs_per_image: int | None
    flops_source: str | None


@dataclass(frozen=True)
class BenchRow:
    """One backend at one batch size.

    ``gflops`` is the achieved rate (giga-ops for int8 rows: a multiply-add counts 2);
    ``utilisation`` is it over the CPU's fp32 (or int8) peak. ``peak_rss_mb`` is the
    process's resident-set peak from the backend's session creation through this
    batch; ``rss_increase_mb`` the same over the resident set before the backend.
    With fewer than 100 iterations, p99 is close to the slowest call.
    """

    backend: str
    precision: str
    batch: int
    threads: int
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    throughput_ips: float
    iterations: int
    peak_rss_mb: float | None
    rss_increase_mb: float | None
    gflops: float | None
    utilisation: float | None
    max_abs_diff_vs_reference: float | None


@dataclass
class BenchReport:
    """Rows of every backend and batch measured in one run, with the machine and model they ran on."""

    target: str
    cpu: CpuInfo
    model: ModelInfo
    rows: list[BenchRow]
    reference_backend: str | None
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)

    def row(self, backend: str, batch: int) -> BenchRow:
        for row in self.rows:
            if row.backend == backend and row.batch == batch:
                return row
        have = ", ".join(f"{r.backend}@{r.batch}" for r in self.rows) or "none"
        raise UsageError(f"no benchmark row for {backend} at batch {batch} (have: {have})")

    def speedup(self, backend_a: str, backend_b: str, batch: int) -> float:
        """How many times faster ``backend_a`` is than ``backend_b`` at ``batch`` (ratio of median latencies)."""
        return self.row(backend_b, batch).latency_p50_ms / self.row(backend_a, batch).latency_p50_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "cpu": self.cpu.to_dict(),
            "model": {**asdict(self.model), "input_shape": list(self.model.input_shape)},
            "rows": [asdict(row) for row in self.rows],
            "reference_backend": self.reference_backend,
            "notes": list(self.notes),
            "versions": dict(self.versions),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchReport:
        model = {**d["model"], "input_shape": tuple(d["model"]["input_shape"])}
        return cls(
            target=d["target"], cpu=CpuInfo.from_dict(d["cpu"]), model=ModelInfo(**model),
            rows=[BenchRow(**row) for row in d["rows"]], reference_backend=d.get("reference_backend"),
            notes=list(d.get("notes", [])), versions=dict(d.get("versions", {})),
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> BenchReport:
        return cls.from_dict(json.loads(text))

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_json(path, self.to_dict())

    def table(self) -> Table:
        """A ``rich.table.Table`` with one line per backend and batch (title: the model; caption: the CPU)."""
        from rich.table import Table

        table = Table(title=_model_line(self.target, self.model), caption=self.cpu.summary())
        for name in ("backend", "prec", "batch", "thr", "p50 ms", "p90 ms", "p99 ms", "img/s",
                     "GFLOP/s", "% peak", "peak RSS MB (+)", "max|Δ| vs ref"):  # fmt: skip
            table.add_column(name, justify="left" if name in ("backend", "prec") else "right")
        for r in self.rows:
            rss = "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f} (+{r.rss_increase_mb:.0f})"
            table.add_row(
                r.backend, r.precision, str(r.batch), str(r.threads), f"{r.latency_p50_ms:.2f}",
                f"{r.latency_p90_ms:.2f}", f"{r.latency_p99_ms:.2f}", f"{r.throughput_ips:.1f}",
                _fmt(r.gflops, "{:.1f}"), _fmt(r.utilisation, "{:.0%}"), rss,
                _fmt(r.max_abs_diff_vs_reference, "{:.1e}"),
            )  # fmt: skip
        return table


def _model_line(target: str, model: ModelInfo) -> str:
    parts = [f"{model.name or 'model'} {'x'.join(map(str, model.input_shape))}"]
    if model.params is not None:
        parts.append(f"{model.params / 1e6:.2f} M params")
    if model.flops_per_image is not None:
        parts.append(f"{model.flops_per_image / 1e9:.3g} GFLOP/image")
    if model.size_mb is not None:
        parts.append(f"{model.size_mb:.1f} MB ONNX")
    return f"{target}: " + ", ".join(parts)


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None or not math.isfinite(value) else pattern.format(value)


# ---------------------------------------------------------------------------- the target


@dataclass(frozen=True)
class _Target:
    """A run folder and/or a verified bundle, and the input shape they take."""

    path: Path
    run_dir: Path | None
    bundle: Bundle | None
    input_shape: tuple[int, int, int]
    model_name: str | None


def resolve_target(target: str | os.PathLike[str]) -> _Target:
    """A run folder (its ``bundle/`` if exported) or a bundle (and the run folder it sits in)."""
    from lensforge.artifacts import resolve_artifact

    path = Path(target)
    artifact = resolve_artifact(path)
    run_dir = artifact.run_dir
    # loading verifies every file's sha256: never bench an altered bundle
    bundle = load_bundle(artifact.bundle_dir) if artifact.bundle_dir is not None else None
    if bundle is not None:
        pre, name = bundle.preprocess, bundle.manifest.get("model")
    else:
        pre, name = _run_preprocess(path)
    return _Target(path, run_dir, bundle, (pre.channels, *pre.input_size), name)


def _run_preprocess(run_dir: Path) -> tuple[Any, str | None]:
    from lensforge.data.preprocess import Preprocess

    try:
        info = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        return Preprocess.from_dict(info["preprocess"]), info.get("model")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"'{run_dir / RUN_FILE}' is damaged or has no preprocess ({e})") from None


# ---------------------------------------------------------------------------- backends


class _Backend(Protocol):
    precision: str

    def step(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """A no-argument call running one forward pass on ``batch`` and returning the logits."""

    def close(self) -> None: ...


BackendFactory = Callable[[_Target, int], "_Backend | str"]  # a backend, or why it was skipped
BACKENDS: Registry[BackendFactory] = Registry("backend")


@BACKENDS.register("torch")
def _torch_backend(target: _Target, threads: int) -> _Backend | str:
    if target.run_dir is None:
        return "torch skipped: no PyTorch model for a bare bundle (bench the run folder it came from)"
    try:
        import torch
    except ImportError:
        return "torch skipped: PyTorch is not installed"
    return _TorchBackend(torch, target.run_dir, threads)


class _TorchBackend:
    precision = "fp32"

    def __init__(self, torch: Any, run_dir: Path, threads: int) -> None:
        from lensforge.models.normalize import Normalize
        from lensforge.train.run import load_run

        self._torch = torch
        self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        run = load_run(run_dir)
        # uint8 in, normalised in the timed call: the same work a bundle's graph does; the task's
        # export module computes every output the bundle has, the first (logits) is compared
        self.model = torch.nn.Sequential(Normalize(run.preprocess.mean, run.preprocess.std),
                                         run.export_module()).eval()

    def step(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        torch, model, tensor = self._torch, self.model, self._torch.from_numpy(batch)

        def run() -> np.ndarray:
            with torch.inference_mode():
                return model(tensor)[0].numpy()

        return run

    def close(self) -> None:
        self._torch.set_num_threads(self._saved_threads)


@BACKENDS.register("onnxruntime")
def _onnxruntime_backend(target: _Target, threads: int) -> _Backend | str:
    if target.bundle is None:
        return f"onnxruntime skipped: {target.path} has no bundle (run `lensforge export {target.path}` first)"
    return _OrtBackend(target.bundle, threads)


class _OrtBackend:
    def __init__(self, bundle: Bundle, threads: int) -> None:
        # a fresh Bundle: its own session, with the bench's threads (intra-op N, inter-op 1, sequential)
        fresh = Bundle(bundle.path, bundle.manifest, intra_op_num_threads=threads)
        self.precision = _precision(bundle)
        self.session, self.input_name, self.model_input = fresh.session, fresh.input_name, fresh.model_input
        self.names = fresh.output_names  # every output is computed, as in use; the first is compared

    def step(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        session, feed, names = self.session, {self.input_name: self.model_input(batch)}, self.names
        return lambda: session.run(names, feed)[0]

    def close(self) -> None:
        self.session = None


@BACKENDS.register("openvino")
def _openvino_backend(target: _Target, threads: int) -> _Backend | str:
    if target.bundle is None:
        return f"openvino skipped: {target.path} has no bundle (run `lensforge export {target.path}` first)"
    return _OpenVinoBackend(_import_openvino(), target.bundle, threads)


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise UsageError(OPENVINO_HINT) from None
    return openvino


class _OpenVinoBackend:
    """OpenVINO on the bundle's ONNX file, compiled per batch with a static shape (its fast path)."""

    def __init__(self, ov: Any, bundle: Bundle, threads: int) -> None:
        self._ov, self._core = ov, ov.Core()
        self._model = self._core.read_model(str(bundle.path / MODEL_FILE))
        self.input_name, self.model_input = bundle.input_name, bundle.model_input
        self.first_output = bundle.output_names[0]
        self.precision = _precision(bundle)
        # f32 explicitly: OpenVINO would run bf16 on CPUs that have it, which is not what we compare
        self._config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}  # fmt: skip

    def step(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        self._model.reshape({self.input_name: self._ov.PartialShape(list(batch.shape))})
        compiled = self._core.compile_model(self._model, "CPU", self._config)
        request, logits = compiled.create_infer_request(), compiled.output(self.first_output)
        feed = {self.input_name: self.model_input(batch)}

        def run() -> np.ndarray:
            return request.infer(feed, share_inputs=True)[logits]

        return run

    def close(self) -> None:
        self._model = self._core = None


def _precision(bundle: Bundle) -> str:
    precision = bundle.manifest.get("precision", "fp32")
    if not isinstance(precision, str) or not precision:
        raise ArtifactError(f"bundle {bundle.path}: precision must be a string like 'int8', not {precision!r}")
    return precision


# ---------------------------------------------------------------------------- timing and memory


@dataclass(frozen=True)
class Timing:
    """How long to measure: warm-up calls, then until both minimums are met (capped at ``max_seconds``)."""

    warmup: int = 10
    min_iters: int = 30
    min_seconds: float = 1.0
    max_seconds: float = 10.0


def time_calls(call: Callable[[], Any], timing: Timing) -> tuple[Any, np.ndarray]:
    """Run ``call`` untimed (its output is returned), warm up, then time each call; latencies in ms.

    The untimed first call counts as warm-up; warm-up stops after ``timing.warmup`` calls
    or a quarter of ``max_seconds``, whichever comes first, so a slow large batch does
    not spend minutes warming up.
    """
    start = time.perf_counter_ns()
    first = call()
    for _ in range(timing.warmup - 1):
        if time.perf_counter_ns() - start >= timing.max_seconds / 4 * 1e9:
            break
        call()
    latencies: list[int] = []
    start = time.perf_counter_ns()
    while True:
        before = time.perf_counter_ns()
        call()
        after = time.perf_counter_ns()
        latencies.append(after - before)
        elapsed = (after - start) / 1e9
        if (len(latencies) >= timing.min_iters and elapsed >= timing.min_seconds) or elapsed >= timing.max_seconds:
            return first, np.asarray(latencies, dtype=np.float64) / 1e6


class PeakRss:
    """The process's resident-set peak from now on (Linux only; ``None`` elsewhere).

    Writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM)
    to the current resident set, so VmHWM read later is the peak since this object.
    Memory an earlier backend freed may be reused by the allocator without growing
    the resident set, so a later backend's increase can be understated; bench one
    backend per process for a clean figure.
    """

    def __init__(self) -> None:
        self.supported = _reset_peak_rss()
        self.before_mb = _proc_status_mb("VmRSS") if self.supported else None

    def peak_mb(self) -> float | None:
        return _proc_status_mb("VmHWM") if self.supported else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_mb("VmHWM") is not None


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


# ---------------------------------------------------------------------------- model size and FLOPs


def model_info(target: _Target, *, use_torch: bool = True) -> ModelInfo:
    """Sizes, parameters and FLOPs per image, from the torch model when there is one."""
    onnx_path = target.bundle.path / MODEL_FILE if target.bundle is not None else None
    weights = target.run_dir / WEIGHTS_FILE if target.run_dir is not None else None
    params = flops = None
    source = None
    if use_torch and weights is not None and weights.is_file():
        params, flops = _torch_counts(target.run_dir, target.input_shape)
        source = "torch.utils.flop_counter"
    if onnx_path is not None and params is None:
        params = onnx_parameter_count(onnx_path)
    if flops is None and target.bundle is not None:
        manifest_flops = target.bundle.manifest.get("flops_per_image")
        if isinstance(manifest_flops, (int, float)) and manifest_flops > 0:
            flops, source = int(manifest_flops), "manifest"
        else:
            flops, source = count_onnx_flops(onnx_path), "onnx graph"
    return ModelInfo(
        name=target.model_name,
        input_shape=target.input_shape,
        size_mb=_size_mb(onnx_path),
        weights_size_mb=_size_mb(weights),
        params=params,
        flops_per_image=flops,
        macs_per_image=None if flops is None else flops // 2,
        flops_source=source,
    )


def _size_mb(path: Path | None) -> float | None:
    return path.stat().st_size / _MB if path is not None and path.is_file() else None


def _torch_counts(run_dir: Path, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    from lensforge.train.run import load_run

    model = load_run(run_dir).model
    params = sum(p.numel() for p in model.parameters())
    return params, count_torch_flops(model, input_shape)


def count_torch_flops(model: Any, input_shape: Sequence[int]) -> int:
    """Forward FLOPs of one image (``torch.utils.flop_counter``: a multiply-add counts 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


# which input holds the weights (Conv) or the left operand (MatMul) for each counted op
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_MATMUL_LEFT = {"MatMul": 0, "Gemm": 0, "MatMulInteger": 0, "QLinearMatMul": 0}


def count_onnx_flops(path: str | os.PathLike[str]) -> int:
    """Forward FLOPs of one image through the Conv, Gemm and MatMul nodes of an ONNX file.

    Used only for a bundle without a PyTorch model or a ``flops_per_image`` in its
    manifest. Written here because the maintained ONNX FLOP counters are extra
    dependencies for ~30 lines: ONNX shape inference (with the batch fixed to 1)
    gives every tensor's shape, and a Conv costs 2 x output elements x (Cin/groups x
    kH x kW), a MatMul or Gemm 2 x output elements x the inner dimension. Like
    torch's counter, element-wise ops, pooling and bias adds are not counted; QDQ
    (int8) graphs count the same as their fp32 source.
    """
    import onnx

    model = onnx.load(str(path))
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    del model.graph.value_info[:]
    graph = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    for info in (*graph.input, *graph.value_info, *graph.output):
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in info.type.tensor_type.shape.dim]
    flops = 0
    for node in graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type in _CONV_WEIGHT:
            inner = shapes.get(node.input[_CONV_WEIGHT[node.op_type]], [])[1:]
        elif node.op_type in _MATMUL_LEFT:
            left = shapes.get(node.input[0], [])
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            inner = left[-2:-1] if trans_a else left[-1:]
        else:
            continue
        if out and inner:
            flops += 2 * math.prod(out) * math.prod(inner)
    return flops


def onnx_parameter_count(path: str | os.PathLike[str]) -> int:
    """Elements in the ONNX file's initializers (weights, biases, folded norms, small constants)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(math.prod(init.dims) for init in model.graph.initializer)


# ---------------------------------------------------------------------------- the benchmark


def parse_batches(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)`` (for the CLI's ``--batch``)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--batch must be comma-separated whole numbers like 1,8,32, not {text!r}") from None


def benchmark(
    target: str | os.PathLike[str],
    *,
    backends: Sequence[str] = ("torch", "onnxruntime"),
    batches: Sequence[int] = (1, 8, 32),
    threads: int | None = None,
    warmup: int = 10,
    min_iters: int = 30,
    min_seconds: float = 1.0,
    max_seconds: float = 10.0,
    seed: int = 0,
) -> BenchReport:
    """Benchmark a run folder or a bundle on each backend and batch size, side by side.

    Args:
        target: a run folder (PyTorch from its weights; ONNX backends from ``RUN/bundle``)
            or a bundle (PyTorch too when the bundle sits in a run folder).
        backends: any of ``torch``, ``onnxruntime``, ``openvino``; those the target cannot
            feed are skipped with a note.
        batches: batch sizes (1 to 4096).
        threads: CPU threads for every backend; default: the cores this process may use.
        warmup, min_iters, min_seconds, max_seconds: see :class:`Timing`.
        seed: of the random uint8 images (the same arrays go to every backend).

    Raises:
        UsageError: a bad option, an unusable target, OpenVINO asked for but missing,
            or no backend could run.
        ArtifactError: a damaged run folder or an altered bundle.
    """
    names = _check_backends(backends)
    batch_sizes = _check_batches(batches)
    timing = _check_timing(warmup, min_iters, min_seconds, max_seconds)
    cpu = detect_cpu()
    threads = cpu.usable_cores if threads is None else _check_threads(threads)
    if "openvino" in names:
        _import_openvino()  # fail before minutes of other backends
    resolved = resolve_target(target)
    notes = _busy_cpu_notes(cpu)
    if threads > cpu.usable_cores:
        notes.append(f"{threads} threads on {cpu.usable_cores} usable cores: oversubscribed, latencies will suffer")
    model = model_info(resolved, use_torch=_torch_usable(resolved))
    rng = np.random.default_rng(seed)
    inputs = {b: rng.integers(0, 256, (b, *resolved.input_shape), dtype=np.uint8) for b in batch_sizes}
    rows: list[BenchRow] = []
    reference: tuple[str, dict[int, np.ndarray]] | None = None
    for name in names:
        outcome = _bench_backend(name, resolved, threads, inputs, timing, cpu, model, reference)
        if isinstance(outcome, str):
            notes.append(outcome)
            continue
        backend_rows, outputs = outcome
        rows.extend(backend_rows)
        reference = reference or (name, outputs)
    if not rows:
        raise UsageError(f"{target}: nothing to benchmark ({'; '.join(notes)})")
    notes.extend(_utilisation_notes(rows, cpu))
    return BenchReport(
        target=str(target), cpu=cpu, model=model, rows=rows, reference_backend=reference[0] if reference else None,
        notes=notes, versions=_versions(names),
    )  # fmt: skip


def _bench_backend(
    name: str,
    target: _Target,
    threads: int,
    inputs: dict[int, np.ndarray],
    timing: Timing,
    cpu: CpuInfo,
    model: ModelInfo,
    reference: tuple[str, dict[int, np.ndarray]] | None,
) -> tuple[list[BenchRow], dict[int, np.ndarray]] | str:
    """Every batch on one backend; the peak memory covers its creation and all runs so far."""
    gc.collect()
    memory = PeakRss()
    backend = BACKENDS.get(name)(target, threads)
    if isinstance(backend, str):
        return backend
    rows, outputs = [], {}
    try:
        for batch, x in inputs.items():
            first, latencies_ms = time_calls(backend.step(x), timing)
            outputs[batch] = np.asarray(first, dtype=np.float32)
            peak = memory.peak_mb()
            diff = _max_abs_diff(outputs[batch], reference[1].get(batch)) if reference else 0.0
            rows.append(_row(name, backend.precision, batch, threads, latencies_ms, peak, memory.before_mb,
                             cpu, model, diff))  # fmt: skip
    finally:
        backend.close()
    return rows, outputs


def _row(
    backend: str, precision: str, batch: int, threads: int, latencies_ms: np.ndarray, peak_mb: float | None,
    before_mb: float | None, cpu: CpuInfo, model: ModelInfo, diff: float | None,
) -> BenchRow:  # fmt: skip
    p50, p90, p99 = (float(v) for v in np.percentile(latencies_ms, [50, 90, 99]))
    mean = float(latencies_ms.mean())
    throughput = batch * 1000.0 / mean
    gflops = model.flops_per_image * throughput / 1e9 if model.flops_per_image else None
    peak = {"fp32": cpu.peak_gflops_fp32, "int8": cpu.peak_gops_int8}.get(precision)
    return BenchRow(
        backend=backend, precision=precision, batch=batch, threads=threads,
        latency_p50_ms=p50, latency_p90_ms=p90, latency_p99_ms=p99, latency_mean_ms=mean,
        throughput_ips=throughput, iterations=len(latencies_ms),
        peak_rss_mb=peak_mb, rss_increase_mb=None if peak_mb is None or before_mb is None else peak_mb - before_mb,
        gflops=gflops, utilisation=gflops / peak if gflops is not None and peak else None,
        max_abs_diff_vs_reference=diff,
    )  # fmt: skip


def _max_abs_diff(ours: np.ndarray, theirs: np.ndarray | None) -> float | None:
    if theirs is None or ours.shape != theirs.shape:
        return None
    return float(np.abs(ours - theirs).max())


def _utilisation_notes(rows: list[BenchRow], cpu: CpuInfo) -> list[str]:
    notes = []
    if any(r.utilisation is not None and r.utilisation > 1 for r in rows):
        notes.append(
            f"achieved rate above the estimated peak: the clock is higher than the {cpu.clock_ghz:.2f} GHz "
            f"assumed ({cpu.clock_source}), or a backend does fewer multiplies than counted (e.g. Winograd)"
        )
    if any(r.precision not in ("fp32", "int8") for r in rows):
        notes.append("no peak estimate for precisions other than fp32 and int8: utilisation left blank")
    return notes


def _busy_cpu_notes(cpu: CpuInfo) -> list[str]:
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows
        return []
    if load < 0.5:
        return []
    return [
        f"1-minute load average {load:.1f} on {cpu.usable_cores} usable cores before the benchmark: "
        "other work competes for the CPU, so latencies are pessimistic and noisy"
    ]


def _torch_usable(target: _Target) -> bool:
    if target.run_dir is None:
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _versions(backends: Iterable[str]) -> dict[str, str | None]:
    packages = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("lensforge", "numpy", *(packages[b] for b in backends)):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def backend_status() -> list[dict[str, Any]]:
    """Each registered backend: ``{"name", "available", "version", "note"}`` (for `lensforge list backends`)."""
    notes = {"torch": "a run's PyTorch model", "onnxruntime": "a bundle (model.onnx)",
             "openvino": "a bundle, fp32 (extra: openvino)"}
    rows = []
    for name in BACKENDS.list():
        try:
            version: str | None = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = None
        available = version is not None and importlib.util.find_spec(name) is not None
        rows.append({"name": name, "available": available, "version": version, "note": notes.get(name, "")})
    return rows


# ---------------------------------------------------------------------------- validation


def _check_backends(backends: Sequence[str] | str) -> list[str]:
    if isinstance(backends, str):
        backends = [backends]
    names = list(dict.fromkeys(backends))  # drop repeats, keep order
    if not names:
        raise UsageError(f"no backend given; choose from {', '.join(BACKENDS.list())}")
    for name in names:
        if name not in BACKENDS:
            close = difflib.get_close_matches(str(name), BACKENDS.list(), n=2, cutoff=0.4)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UsageError(f"unknown backend {name!r}{hint} (choose from {', '.join(BACKENDS.list())})")
    return names


def _check_batches(batches: Sequence[int] | int) -> list[int]:
    if isinstance(batches, int) and not isinstance(batches, bool):
        batches = [batches]
    sizes = list(batches)
    if not sizes:
        raise UsageError("no batch size given (e.g. --batch 1,8,32)")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= MAX_BATCH:
            raise UsageError(f"batch size must be a whole number from 1 to {MAX_BATCH}, not {size!r}")
    return sorted({int(size) for size in sizes})


def _check_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise UsageError(f"--threads must be a whole number >= 1, not {threads!r}")
    return int(threads)


def _check_timing(warmup: int, min_iters: int, min_seconds: float, max_seconds: float) -> Timing:
    if not isinstance(warmup, int) or warmup < 0:
        raise UsageError(f"warmup must be a whole number >= 0, not {warmup!r}")
    if not isinstance(min_iters, int) or min_iters < 1:
        raise UsageError(f"min_iters must be a whole number >= 1, not {min_iters!r}")
    if not min_seconds >= 0 or not max_seconds > 0 or not math.isfinite(max_seconds):
        raise UsageError(f"min_seconds must be >= 0 and max_seconds > 0, not {min_seconds!r} and {max_seconds!r}")
    if max_seconds < min_seconds:
        raise UsageError(f"max_seconds ({max_seconds}) is below min_seconds ({min_seconds})")
    return Timing(warmup, min_iters, float(min_seconds), float(max_seconds))


__all__ = [
    "BACKENDS", "BenchReport", "BenchRow", "ModelInfo", "PeakRss", "Timing", "benchmark",
    "count_onnx_flops", "count_torch_flops", "model_info", "onnx_parameter_count", "parse_batches",
    "resolve_target", "time_calls",
]  # fmt: skip
