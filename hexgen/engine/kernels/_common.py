"""Helpers shared by the kernels' launch wrappers."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dots_in_fp32(t: torch.Tensor) -> bool:
    """Whether matrix products over `t` run in float32 rather than in its own dtype.

    Always on CPU: the interpreter (TRITON_INTERPRET=1) keeps bfloat16 as raw uint16 bits and would
    multiply the bits as integers. On CUDA, 16-bit inputs go to tensor cores as they are; the
    accumulation is float32 either way.
    """
    return t.dtype == torch.float32 or t.device.type == "cpu"


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (float32, bfloat16 or float16)")
