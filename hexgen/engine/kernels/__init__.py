"""Triton kernels for CUDA: paged attention, residual-add + RMSNorm, RoPE + KV-cache write, KV write, SiLU * up.

The engine asks `available()` first; only when it says yes does it call `paged_attention`, `add_rms_norm`,
`rotary_write_kv`, `write_kv` or `silu_mul` from this package. Each is imported from its module on first use, so
importing the package never imports triton, and without triton or CUDA the engine keeps its torch path.
HEXGEN_TRITON=0 in the environment keeps the torch path on CUDA too (to compare, or to work around a kernel that
fails to compile on some GPU).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

_KERNELS = {  # public name -> module that defines it
    "paged_attention": "attention",
    "choose_kv_splits": "attention",
    "add_rms_norm": "fused_norm",
    "write_kv": "kv_write",
    "rotary_write_kv": "rotary",
    "silu_mul": "activation",
}
__all__ = ["available", *_KERNELS]


@functools.cache
def available() -> bool:
    """Whether the Triton kernels can run on this machine: a CUDA device visible, triton importable and
    HEXGEN_TRITON not set to 0."""
    import torch

    if os.environ.get("HEXGEN_TRITON", "1") == "0":
        return False
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return False
    try:  # a triton that does not match the installed torch/CUDA fails here, not in the middle of a step
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def __getattr__(name: str):
    """Import a kernel's module on first access (PEP 562) and keep the function as a plain attribute."""
    if name not in _KERNELS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    function = getattr(importlib.import_module(f"{__name__}.{_KERNELS[name]}"), name)
    globals()[name] = function
    return function
