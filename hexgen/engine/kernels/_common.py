"""Helpers shared by the kernels' launch wrappers (imports triton)."""

from __future__ import annotations

import torch
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1, CPU tensors) stores bfloat16 as raw uint16 bits and multiplies
# those bits as integers; on CPU the kernels therefore run their products in float32. On CUDA the
# products run in the input dtype on tensor cores, with float32 accumulation either way.
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_dtype(t: torch.Tensor):
    """The triton dtype that matrix products of `t` run in."""
    return tl.float32 if t.device.type == "cpu" else _TL_DTYPES[t.dtype]


def dot_precision(t: torch.Tensor) -> str:
    """Full float32 products for float32 inputs (triton would otherwise use TF32 on CUDA)."""
    return "ieee" if t.dtype == torch.float32 or t.device.type == "cpu" else "tf32"


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _TL_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (float32, bfloat16 or float16)")
