"""CPU detection: instruction sets, cores, clock and the peak estimate, on fixed /proc/cpuinfo texts."""

from __future__ import annotations

import pytest

from lensforge.utils.hardware import CpuInfo, detect_cpu, parse_cpuinfo


def cpuinfo(blocks: list[dict[str, str]]) -> str:
    return "\n\n".join("\n".join(f"{k}\t: {v}" for k, v in block.items()) for block in blocks) + "\n"


X86_BASE = "fpu vme sse sse2 ht syscall nx lm sse4_1 sse4_2 popcnt aes xsave avx f16c"
XEON_FLAGS = f"{X86_BASE} fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
ZEN4_FLAGS = f"{X86_BASE} fma avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni"


def xeon(cpus: int = 4, smt: bool = True) -> str:
    """An Ice Lake Xeon: logical CPUs 0..n-1; with SMT, CPU i and i + n/2 share a core."""
    cores = cpus // 2 if smt else cpus
    return cpuinfo([
        {"processor": str(i), "vendor_id": "GenuineIntel", "cpu family": "6", "model": "106",
         "model name": "Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz", "cpu MHz": "2300.000",
         "physical id": "0", "siblings": str(cpus), "core id": str(i % cores), "cpu cores": str(cores),
         "flags": XEON_FLAGS}
        for i in range(cpus)
    ])  # fmt: skip


ZEN4 = cpuinfo([
    {"processor": str(i), "vendor_id": "AuthenticAMD", "cpu family": "25", "model": "17",
     "model name": "AMD EPYC", "cpu MHz": "2596.128", "physical id": "0", "siblings": "2",
     "core id": str(i), "cpu cores": "2", "flags": ZEN4_FLAGS}
    for i in range(2)
])  # fmt: skip

LAPTOP = cpuinfo([
    {"processor": str(i), "vendor_id": "GenuineIntel", "cpu family": "6",
     "model name": "Intel(R) Core(TM) i7-8550U CPU @ 1.80GHz", "physical id": "0",
     "core id": str(i % 4), "cpu cores": "4", "flags": f"{X86_BASE} fma avx2"}
    for i in range(8)
])  # fmt: skip

ARM = cpuinfo([
    {"processor": str(i), "BogoMIPS": "108.00", "Features": "fp asimd evtstrm crc32 cpuid",
     "CPU implementer": "0x41", "CPU part": "0xd08"}
    for i in range(4)
])  # fmt: skip


def test_intel_avx512_server_with_smt_counts_physical_cores():
    info = parse_cpuinfo(xeon(4), max_freq_khz=3_400_000, affinity={0, 1, 2, 3})
    assert not info.peak_is_lower_bound  # the maximum (turbo) clock is known
    assert info.vendor == "GenuineIntel" and "Xeon" in info.model_name
    assert {"avx2", "fma", "avx512f", "avx512_vnni"} <= set(info.isa)
    assert (info.logical_cores, info.physical_cores, info.usable_cores, info.peak_cores) == (4, 2, 4, 2)
    assert info.clock_ghz == pytest.approx(3.4) and info.clock_source == "cpufreq cpuinfo_max_freq"
    assert info.fp32_flops_per_cycle_per_core == 64  # 2 FMA units x 16 lanes x 2
    assert info.int8_ops_per_cycle_per_core == 256  # VNNI: 4x
    assert info.peak_gflops_fp32 == pytest.approx(64 * 3.4 * 2)
    assert info.peak_gops_int8 == pytest.approx(256 * 3.4 * 2)
    assert any("SMT" in note for note in info.notes) and any("2 FMA units" in note for note in info.notes)


def test_affinity_limits_the_cores_in_the_peak():
    # CPUs 0 and 2 are the two threads of core 0: one core's worth of vector units
    info = parse_cpuinfo(xeon(4), max_freq_khz=3_000_000, affinity={0, 2})
    assert (info.usable_cores, info.peak_cores) == (2, 1)
    assert info.peak_gflops_fp32 == pytest.approx(64 * 3.0)
    no_smt = parse_cpuinfo(xeon(4, smt=False), affinity={1, 3})
    assert (no_smt.usable_cores, no_smt.peak_cores) == (2, 2)
    assert no_smt.clock_ghz == pytest.approx(2.3) and no_smt.clock_source == "/proc/cpuinfo cpu MHz"


def test_amx_sets_the_int8_peak():
    text = xeon(2, smt=False).replace(XEON_FLAGS, f"{XEON_FLAGS} amx_tile amx_bf16 amx_int8")
    info = parse_cpuinfo(text, max_freq_khz=2_000_000)
    assert {"amx_tile", "amx_int8"} <= set(info.isa)
    assert info.int8_ops_per_cycle_per_core == 2048 and info.fp32_flops_per_cycle_per_core == 64
    assert any("AMX" in note for note in info.notes)


def test_amd_zen4_runs_avx512_at_the_avx2_rate():
    info = parse_cpuinfo(ZEN4, affinity={0, 1})
    assert info.vendor == "AuthenticAMD" and "avx512f" in info.isa
    assert info.fp32_flops_per_cycle_per_core == 32  # 512-bit ops as 2 x 256-bit
    assert info.int8_ops_per_cycle_per_core == 128
    assert info.clock_ghz == pytest.approx(2.596128) and info.clock_source == "/proc/cpuinfo cpu MHz"
    assert info.peak_gflops_fp32 == pytest.approx(32 * 2.596128 * 2)
    assert any("Zen 4" in note for note in info.notes)
    assert any("turbo" in note for note in info.notes)  # cpu MHz may be the nominal clock
    assert info.peak_is_lower_bound  # turbo can beat a peak computed from the nominal clock
    assert info.summary() == "AMD EPYC, 2 of 2 CPUs, AVX-512+VNNI, 2.60 GHz: peak >= 166 GFLOP/s fp32"
    zen5 = parse_cpuinfo(ZEN4.replace("cpu family\t: 25", "cpu family\t: 26"))
    assert zen5.fp32_flops_per_cycle_per_core == 64


def test_avx2_laptop_clock_from_the_model_name():
    info = parse_cpuinfo(LAPTOP, affinity=set(range(8)))
    assert "avx512f" not in info.isa and {"avx2", "fma"} <= set(info.isa)
    assert info.fp32_flops_per_cycle_per_core == 32
    assert info.int8_ops_per_cycle_per_core == 42  # no VNNI: 4 MACs per lane in 3 instructions
    assert info.clock_ghz == pytest.approx(1.8) and info.clock_source == "model name"
    assert (info.physical_cores, info.peak_cores) == (4, 4)
    assert info.peak_gflops_fp32 == pytest.approx(32 * 1.8 * 4)


def test_arm_without_x86_flags_gets_a_conservative_estimate():
    info = parse_cpuinfo(ARM, max_freq_khz=1_500_000, affinity={0, 1, 2, 3})
    assert info.isa == ("asimd",) and info.usable_cores == info.peak_cores == 4
    assert info.fp32_flops_per_cycle_per_core == 8 and info.int8_ops_per_cycle_per_core == 8
    assert info.peak_gflops_fp32 == pytest.approx(8 * 1.5 * 4)
    assert any("NEON" in note for note in info.notes)
    bare = parse_cpuinfo(ARM.replace("fp asimd evtstrm crc32 cpuid", "fp"), affinity={0})
    assert bare.fp32_flops_per_cycle_per_core == 8 and any("conservative" in n for n in bare.notes)
    assert bare.clock_ghz is None and bare.peak_gflops_fp32 is None and bare.peak_gops_int8 is None
    assert any("clock unknown" in note for note in bare.notes)


def test_no_cpuinfo_at_all_is_noted_not_fatal():
    info = parse_cpuinfo("", affinity={0, 1}, fallback_name="arm64")
    assert info.model_name == "arm64" and info.usable_cores == 2 and info.peak_gflops_fp32 is None
    assert any("no /proc/cpuinfo" in note for note in info.notes)


def test_round_trip_and_this_machine():
    info = detect_cpu()
    assert CpuInfo.from_dict(info.to_dict()) == info
    assert 1 <= info.usable_cores <= info.logical_cores and 1 <= info.peak_cores <= info.usable_cores
    assert info.fp32_flops_per_cycle_per_core >= 8
    assert info.peak_gflops_fp32 is None or info.peak_gflops_fp32 > 0
