"""One line describing this machine for benchmark tables: CPU model, vector extensions, cores, GPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("unknown CPU", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    vector = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f in flags]
    return f"{model} ({', '.join(vector) or 'no AVX'}), {os.cpu_count()} cores"
