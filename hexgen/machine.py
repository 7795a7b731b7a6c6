"""One line describing this machine for benchmark tables: CPU model, vector extensions, cores, GPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("unknown CPU", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return model, flags


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask (`taskset`, a cgroup's cpuset), as torch's default thread
    count counts them, not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity masks on this platform
        return os.cpu_count() or 1


def cpu_description() -> str:
    model, flags = _cpu_model_and_flags()
    vector = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f in flags]
    return f"{model} ({', '.join(vector) or 'no AVX'}), {usable_cores()} cores"


def cpu_has_bf16_arithmetic() -> bool:
    """Whether this x86 CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16): where measured (the 2-core Sapphire
    Rapids Xeon, README "Engine"), bf16 served SmolLM2 1.5x / 1.85x faster than fp32 at 1 / 16 streams."""
    _, flags = _cpu_model_and_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_lacks_bf16_matmul() -> bool:
    """Whether this x86 CPU lacks what oneDNN's bf16 matrix products need (AVX-512 BW/VL/DQ, AVX-NE-CONVERT or
    AMX): torch then multiplies bf16 on a slow generic path. False where /proc/cpuinfo says nothing (not x86
    Linux): no claim either way."""
    _, flags = _cpu_model_and_flags()
    if not flags or "avx2" not in flags:
        return False
    avx512 = {"avx512bw", "avx512vl", "avx512dq"} <= flags
    return not (avx512 or "avx_ne_convert" in flags or "amx_bf16" in flags)
