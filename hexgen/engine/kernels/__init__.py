"""Triton kernels for CUDA: paged attention, fused residual-add + RMSNorm, KV-cache write.

Nothing here imports triton at package import: the engine asks `available()` first and, only when it
says yes, imports `paged_attention`, `fused_norm` or `kv_write` from this package's modules. Without
triton or without CUDA the engine keeps its torch path.
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def available() -> bool:
    """Whether the Triton kernels can run on this machine: triton importable and a CUDA device visible."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available()
