"""What CUDA devices this machine has, for the checks that run before any rank starts (torch stays in engine/)."""

from __future__ import annotations

import torch

from hexgen.errors import UserError


def cuda_device_count() -> int:
    """CUDA devices torch sees; 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_cuda() -> None:
    """--device cuda on a machine where torch sees no CUDA device: a one-line error before anything starts."""
    if not cuda_device_count():
        raise UserError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); use cpu")


def cuda_memory_bytes() -> list[int]:
    """Each visible CUDA device's memory, bytes."""
    return [torch.cuda.get_device_properties(i).total_memory for i in range(cuda_device_count())]


def cuda_device_name(index: int = 0) -> str:
    return torch.cuda.get_device_name(index)


def cuda_bf16_everywhere() -> bool:
    """Whether every visible CUDA device computes in bfloat16 natively (compute capability 8.0 on: Ampere, Hopper and
    later); True with none visible (the device check that follows says what is missing)."""
    return all(torch.cuda.get_device_capability(i)[0] >= 8 for i in range(cuda_device_count()))
