"""The machine a run measures on: device, precision, CPU name, and how much CPU other processes took meanwhile."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def cpu_supports_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX); without them bf16 is emulated and far slower than fp32."""
    has_isa = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return has_isa and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_device_and_dtype(force_cpu: bool) -> tuple[str, torch.dtype | None]:
    """(device, autocast dtype or None for plain fp32)."""
    if torch.cuda.is_available() and not force_cpu:
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.bfloat16 if cpu_supports_bf16() else None


def dtype_name(dtype: torch.dtype | None) -> str:
    return f"{str(dtype).removeprefix('torch.')} autocast" if dtype else "float32"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def autocast(device: str, dtype: torch.dtype | None):
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class CpuSnapshot:
    """Busy and total CPU seconds of the whole machine (/proc/stat) and of this process and its children."""

    machine_busy_s: float
    machine_total_s: float
    own_s: float


def cpu_snapshot() -> CpuSnapshot | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already counted in user time; only the first 8 fields add up to the total
    total = sum(fields[:8])
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system
    return CpuSnapshot(machine_busy_s=(total - idle) / tick, machine_total_s=total / tick, own_s=own)


def other_processes_share(before: CpuSnapshot | None, after: CpuSnapshot | None) -> float | None:
    """Fraction of the machine's CPU time that other processes used between two snapshots (0 = we were alone,
    1 = every core was busy with somebody else). On a virtual machine, time the host stole counts as others'."""
    if before is None or after is None or after.machine_total_s <= before.machine_total_s:
        return None
    others = (after.machine_busy_s - before.machine_busy_s) - (after.own_s - before.own_s)
    return max(0.0, others / (after.machine_total_s - before.machine_total_s))


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, ValueError):
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    return None
