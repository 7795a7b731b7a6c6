"""What `hexgen cluster probe` measures on one machine with torch: its GPUs, or its CPU's speed for CPU slots."""

from __future__ import annotations

import time

import torch

COPY_BYTES = 64 * 2**20
MATMUL_SIZE = 512


def describe_devices() -> dict[str, object]:
    """GPU name, count and memory (GiB), plus the measured memory bandwidth (GB/s) and matmul TFLOPS of one device
    (the first GPU, else the whole CPU)."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device, dtype = torch.device("cuda", 0), torch.float16
        name, count, memory_gb = props.name, torch.cuda.device_count(), props.total_memory / 2**30
    else:
        device, dtype = torch.device("cpu"), torch.float32
        name, count, memory_gb = None, 0, 0.0
    return {"gpu_name": name, "gpu_count": count, "gpu_memory_gb": memory_gb,
            "bandwidth_gbs": _copy_gbs(device), "tflops": _matmul_tflops(device, dtype)}


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def _copy_gbs(device: torch.device) -> float:
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), device, 5)
    return 2 * COPY_BYTES / seconds / 1e9  # one read and one write per byte


def _matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device).to(dtype)
    seconds = _timed(lambda: a @ a, device, 5)
    return 2 * MATMUL_SIZE**3 / seconds / 1e12
