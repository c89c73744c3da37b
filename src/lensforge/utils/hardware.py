"""What this CPU can do at best: instruction sets, cores, clock and an estimated peak.

The peak is a model, not a measurement: it tells a user how far a measured
throughput is from what the cores could do, so they know whether a faster kernel
(or int8) can still help. No torch import: ``lensforge bench`` on a bundle-only
host uses this too.

Peak = FLOP per cycle per core x clock x cores this process may use (SMT siblings
share their core's vector units, so two logical CPUs on one core count once).
FLOP per cycle per core, from the flags in ``/proc/cpuinfo`` (first match wins):

==============================  ===============  ======================================
instruction set                 fp32 FLOP/cycle  why
==============================  ===============  ======================================
AVX-512F, Intel / AMD Zen 5     64               2 FMA units x 16 lanes x 2 (mul + add)
AVX-512F, AMD Zen 4 (family 25) 32               512-bit ops split into 2 x 256-bit
AVX2 + FMA                      32               2 FMA units x 8 lanes x 2
AVX without FMA                 16               1 mul + 1 add unit x 8 lanes
anything else (SSE, NEON, ...)  8                one 128-bit FMA (or mul + add) per cycle
==============================  ===============  ======================================

int8 operations (a multiply-add counts as 2, like FLOPs) per cycle per core:

==============================  ===============  ======================================
instruction set                 int8 ops/cycle   why
==============================  ===============  ======================================
AMX-INT8                        2048             one TMUL: 1024 int8 MACs per cycle
AVX-512 VNNI / AVX-VNNI         4 x fp32 rate    VPDPBUSD: 4 MACs per 32-bit lane
AVX2 / AVX-512BW, no VNNI       4/3 x fp32 rate  VPMADDUBSW + VPMADDWD + VPADDD: 4 MACs
                                                 per 32-bit lane in 3 instructions
ARM dot product (asimddp)       4 x fp32 rate    SDOT: 4 MACs per 32-bit lane
anything else                   1 x fp32 rate    conservative
==============================  ===============  ======================================

The clock is the highest we can find: sysfs ``cpuinfo_max_freq`` (the boost
clock), else ``cpu MHz`` in /proc/cpuinfo (current clock; under a hypervisor the
nominal one), else the "@ 2.60GHz" in the model name. Turbo clocks vary with load
and AVX-512 licences, so a measured rate can land somewhat above or below the
estimate; the ``notes`` say which assumptions were made.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CPUINFO_PATH = Path("/proc/cpuinfo")
MAX_FREQ_PATH = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")

# flags worth showing (a /proc/cpuinfo line holds a hundred); ARM calls NEON "asimd"
ISA_FLAGS = (
    "sse4_2", "avx", "fma", "f16c", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
    "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16",
)  # fmt: skip
_FALLBACK_FP32_FLOPS = 8
_AMX_INT8_OPS = 2048


@dataclass(frozen=True)
class CpuInfo:
    """This CPU and its estimated peak rates (see the module docstring for the model).

    Attributes:
        isa: the interesting instruction-set flags found (``ISA_FLAGS`` order).
        peak_cores: cores counted in the peak: physical cores among the usable CPUs.
        clock_ghz / clock_source: the clock used for the peak and where it came from.
        peak_gflops_fp32 / peak_gops_int8: None when no clock could be found.
    """

    model_name: str
    vendor: str
    logical_cores: int
    physical_cores: int
    usable_cores: int
    peak_cores: int
    isa: tuple[str, ...]
    clock_ghz: float | None
    clock_source: str | None
    fp32_flops_per_cycle_per_core: int
    int8_ops_per_cycle_per_core: int
    peak_gflops_fp32: float | None
    peak_gops_int8: float | None
    notes: tuple[str, ...] = field(default=())

    def has(self, flag: str) -> bool:
        return flag in self.isa

    @property
    def peak_is_lower_bound(self) -> bool:
        """True when the clock is a current or nominal one: turbo can beat the estimated peak."""
        return self.clock_ghz is not None and self.clock_source != "cpufreq cpuinfo_max_freq"

    def summary(self) -> str:
        """One line: ``AMD EPYC, 2 of 2 CPUs, AVX-512+VNNI, 2.60 GHz: peak >= 166 GFLOP/s fp32``."""
        simd = _simd_label(set(self.isa))
        clock = f"{self.clock_ghz:.2f} GHz" if self.clock_ghz else "clock unknown"
        at_least = ">= " if self.peak_is_lower_bound else ""
        peak = (f"peak {at_least}{self.peak_gflops_fp32:.0f} GFLOP/s fp32" if self.peak_gflops_fp32
                else "peak unknown")
        return f"{self.model_name}, {self.usable_cores} of {self.logical_cores} CPUs, {simd}, {clock}: {peak}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["isa"], d["notes"] = list(self.isa), list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CpuInfo:
        return cls(**{**d, "isa": tuple(d["isa"]), "notes": tuple(d.get("notes", ()))})


def detect_cpu() -> CpuInfo:
    """Read /proc/cpuinfo, sysfs and the CPU affinity of this process (anything missing is noted)."""
    try:
        text = CPUINFO_PATH.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    try:
        max_freq_khz: int | None = int(MAX_FREQ_PATH.read_text().strip())
    except (OSError, ValueError):
        max_freq_khz = None
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return parse_cpuinfo(text, max_freq_khz=max_freq_khz, affinity=affinity, fallback_name=platform.processor())


def parse_cpuinfo(
    text: str,
    *,
    max_freq_khz: int | None = None,
    affinity: set[int] | None = None,
    fallback_name: str = "",
) -> CpuInfo:
    """Build a :class:`CpuInfo` from /proc/cpuinfo text and sysfs values (testable without the files).

    Args:
        max_freq_khz: ``cpuinfo_max_freq`` from sysfs, if it exists.
        affinity: the logical CPU ids this process may use; None means all of them.
        fallback_name: the model name when /proc/cpuinfo has none.
    """
    notes: list[str] = []
    blocks = _processor_blocks(text)
    first = blocks[0] if blocks else {}
    if not blocks:
        notes.append("no /proc/cpuinfo: instruction sets and clock unknown, peak is a guess")
    flags = set((first.get("flags") or first.get("Features") or "").split())
    isa = tuple(flag for flag in ISA_FLAGS if flag in flags)
    vendor = first.get("vendor_id") or first.get("CPU implementer") or ""
    name = first.get("model name") or first.get("Processor") or fallback_name or vendor or "unknown CPU"

    logical = len(blocks) or os.cpu_count() or 1
    usable_ids = set(affinity) if affinity is not None else set(range(logical))
    usable = max(1, len(usable_ids))
    physical, peak_cores = _core_counts(blocks, usable_ids)
    if peak_cores < usable:
        notes.append(
            f"{usable} usable CPUs are {peak_cores} physical cores (SMT siblings share vector units): "
            f"the peak counts {peak_cores}"
        )

    fp32 = _fp32_flops_per_cycle(flags, vendor, _int_or_none(first.get("cpu family")), notes)
    int8 = _int8_ops_per_cycle(flags, fp32, notes)
    clock_ghz, clock_source = _clock(first, max_freq_khz, notes)
    peak_fp32 = fp32 * clock_ghz * peak_cores if clock_ghz else None
    peak_int8 = int8 * clock_ghz * peak_cores if clock_ghz else None
    return CpuInfo(
        model_name=name, vendor=vendor, logical_cores=logical, physical_cores=physical,
        usable_cores=usable, peak_cores=peak_cores, isa=isa, clock_ghz=clock_ghz,
        clock_source=clock_source, fp32_flops_per_cycle_per_core=fp32,
        int8_ops_per_cycle_per_core=int8, peak_gflops_fp32=peak_fp32, peak_gops_int8=peak_int8,
        notes=tuple(notes),
    )  # fmt: skip


def _processor_blocks(text: str) -> list[dict[str, str]]:
    """One ``{key: value}`` per ``processor`` block (ARM puts some keys in a trailing block)."""
    blocks: list[dict[str, str]] = []
    shared: dict[str, str] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            current = {}
            blocks.append(current)
        elif current is None or key in ("Hardware", "Revision", "Serial"):
            shared[key] = value
        if current is not None:
            current[key] = value
    # keys outside any block (e.g. "Processor" on old ARM kernels) apply to every block
    return [{**shared, **b} for b in blocks]


def _core_counts(blocks: list[dict[str, str]], usable_ids: set[int]) -> tuple[int, int]:
    """(physical cores in total, physical cores among the usable logical CPUs)."""
    cores: dict[int, tuple[str, str]] = {}
    for i, block in enumerate(blocks):
        cpu = _int_or_none(block.get("processor"))
        if "core id" in block:
            cores[i if cpu is None else cpu] = (block.get("physical id", "0"), block["core id"])
    if not cores:  # no topology (ARM, VMs, other OSes): each logical CPU is a core
        return max(1, len(blocks) or len(usable_ids)), max(1, len(usable_ids))
    usable_cores = {core for cpu, core in cores.items() if cpu in usable_ids}
    return len(set(cores.values())), max(1, len(usable_cores) or len(usable_ids))


def _fp32_flops_per_cycle(flags: set[str], vendor: str, family: int | None, notes: list[str]) -> int:
    amd = "AMD" in vendor.upper()
    if "avx512f" in flags:
        if amd and family is not None and family <= 25:
            notes.append("AMD Zen 4 runs AVX-512 as two 256-bit halves: 32 fp32 FLOP/cycle, as with AVX2")
            return 32
        if not amd:
            notes.append("AVX-512: assumed 2 FMA units per core (some Xeon Silver/Bronze and laptops have 1)")
        return 64
    if "avx2" in flags and "fma" in flags:
        return 32
    if "avx" in flags:
        return 16
    if "asimd" in flags:
        notes.append(
            "ARM NEON: assumed one 128-bit FMA per cycle (8 FLOP/cycle); cores with two "
            "(Cortex-A76+, Neoverse) reach 2x this"
        )
    else:
        notes.append("no AVX/NEON flags recognised: assumed a conservative 8 fp32 FLOP/cycle per core")
    return _FALLBACK_FP32_FLOPS


def _int8_ops_per_cycle(flags: set[str], fp32: int, notes: list[str]) -> int:
    if "amx_int8" in flags:
        notes.append("int8 peak uses AMX tiles (2048 ops/cycle); only AMX kernels (oneDNN, OpenVINO) reach it")
        return _AMX_INT8_OPS
    if flags & {"avx512_vnni", "avx_vnni", "asimddp"}:
        return 4 * fp32
    if "avx2" in flags or "avx512bw" in flags:
        return fp32 * 4 // 3
    return fp32


def _clock(first: dict[str, str], max_freq_khz: int | None, notes: list[str]) -> tuple[float | None, str | None]:
    if max_freq_khz and max_freq_khz > 0:
        return max_freq_khz / 1e6, "cpufreq cpuinfo_max_freq"
    mhz = _float_or_none(first.get("cpu MHz"))
    if mhz and mhz > 0:
        notes.append(
            "clock from 'cpu MHz' (current clock, or the nominal one under a hypervisor): "
            "turbo may be higher, so measured rates can exceed the estimated peak"
        )
        return mhz / 1e3, "/proc/cpuinfo cpu MHz"
    match = re.search(r"@\s*([0-9.]+)\s*GHz", first.get("model name", ""), re.IGNORECASE)
    if match:
        notes.append("clock from the model name (base clock; turbo may be higher)")
        return float(match.group(1)), "model name"
    notes.append("clock unknown: no peak estimate")
    return None, None


def _simd_label(isa: set[str]) -> str:
    if "avx512f" in isa:
        label = "AVX-512"
    elif "avx2" in isa:
        label = "AVX2"
    elif "asimd" in isa:
        label = "NEON"
    else:
        return "no wide SIMD"
    extras = [
        name
        for flag, name in (("avx512_vnni", "VNNI"), ("avx_vnni", "VNNI"), ("asimddp", "dotprod"), ("amx_tile", "AMX"))
        if flag in isa
    ]
    return "+".join([label, *dict.fromkeys(extras)])


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
