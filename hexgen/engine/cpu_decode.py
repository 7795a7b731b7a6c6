"""The CPU decode-attention kernel (`csrc/paged_decode.c`): built with the machine's C compiler at first use,
cached, loaded with ctypes, and called on a step's decodes instead of the gather path where it can.

The gather path copies every decode's keys and values out of the pool before two batched matmuls read the copy;
the kernel walks the block tables and reads the pool in place, one (query token, KV head) pair per OpenMP task. It
runs on the libgomp torch has loaded (the same soname, so one thread pool, the one `turns.py` releases).

Built with `-march=native`, so the shared object is cached per source, compiler and CPU (the key hashes all
three) under $HEXGEN_CACHE_DIR/kernels (else ~/.cache/hexgen/kernels); it is written to a temporary name and
renamed, so ranks building at once do not clash. Where there is no compiler, the build fails or
HEXGEN_CPU_DECODE_KERNEL=0 is set, decodes take the gather path (which also stays as the tests' second opinion).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from hexgen.engine.checkpoint import cache_root

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.c"
DISABLE_ENV = "HEXGEN_CPU_DECODE_KERNEL"  # "0": never use the kernel
PROFILE_NAME = "hexgen::paged_decode"  # the kernel's calls under torch.profiler
# Fast math only when compiling (vectorised expf, reassociated sums); the link step has no -ffast-math, because
# gcc would then link crtfastmath.o, whose constructor flushes denormals process-wide when the object is loaded.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11")
LINK_FLAGS = ("-shared", "-fopenmp")
LIBRARIES = ("-lm",)  # after the object: libm brings libmvec, the vector expf
_ARGTYPES = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6
             + [ctypes.c_float, ctypes.c_int64])
# A sequence that brings up to this many tokens in a step (a decode, or a decode with its draft tokens) is attended
# by the kernel, token by token: each token reads its keys once more, which for a few tokens costs less than a
# gather; longer prefill chunks take the gather path and SDPA, whose tiles reuse each key across many queries.
# SmolLM2's heads on the 2-core Zen 4 EPYC (2026-12-03), one layer's attention of 16 sequences over 1,040 keys:
# 5 tokens each 2.1x (bf16) / 2.0x (fp32) faster than the gather path, 8 tokens 1.2x / 1.6x.
MAX_TOKENS_PER_SEQUENCE = 8


@dataclass(frozen=True)
class Limits:
    max_group: int
    max_head_dim: int
    max_block_size: int
    head_dim_multiple: int  # the kernel's vector width: a head's size must be a multiple of it


@dataclass(frozen=True)
class DecodeKernel:
    library: ctypes.CDLL
    limits: Limits

    def supports(self, dtype: torch.dtype, group: int, head_dim: int, block_size: int) -> bool:
        return (dtype in (torch.float32, torch.bfloat16) and group <= self.limits.max_group
                and head_dim <= self.limits.max_head_dim and head_dim % self.limits.head_dim_multiple == 0
                and block_size <= self.limits.max_block_size)

    def __call__(self, q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, token_seq: torch.Tensor,
                 context_lens: torch.Tensor, kv_heads: int, block_size: int, scale: float) -> torch.Tensor:
        """q [n, h, d] (each token's heads contiguous: a view into the step's fused projection will do) attending
        over a head-major pool [blocks, 2 kv_heads * block_size * d]: token i reads the first context_lens[i] keys
        of sequence token_seq[i], whose blocks are row token_seq[i] of block_tables [b, max_blocks] (all int64,
        on the host) -> [n, h, d]."""
        tokens, heads, head_dim = q.shape
        assert q.stride(2) == 1 and (heads == 1 or q.stride(1) == head_dim), "a token's heads must be contiguous"
        out = torch.empty((tokens, heads, head_dim), dtype=q.dtype)
        function = self.library.paged_decode_bf16 if q.dtype == torch.bfloat16 else self.library.paged_decode_f32
        # one op of its own under torch.profiler (`hexgen bench engine`'s CPU step profile); nothing otherwise
        profiled = torch.autograd.profiler._is_profiler_enabled
        with torch.profiler.record_function(PROFILE_NAME) if profiled else nullcontext():
            function(q.data_ptr(), q.stride(0), pool.data_ptr(), block_tables.data_ptr(), token_seq.data_ptr(),
                     context_lens.data_ptr(), out.data_ptr(), tokens, kv_heads, heads // kv_heads, head_dim,
                     block_size, block_tables.shape[1], scale, torch.get_num_threads())
        return out


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (cpuinfo's first processor)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    first = text.split("\n\n", 1)[0]
    return "\n".join(line for line in first.splitlines() if line.startswith(("model name", "flags")))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _build(compiler: str, target: Path) -> None:
    """Compile then link into `target` (atomically: a temporary name in the same folder, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        obj, lib = Path(scratch) / "paged_decode.o", Path(scratch) / target.name
        subprocess.run([compiler, *COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(obj)], check=True,
                       capture_output=True, text=True)
        subprocess.run([compiler, *LINK_FLAGS, str(obj), "-o", str(lib), *LIBRARIES], check=True, capture_output=True,
                       text=True)
        os.replace(lib, target)


@cache
def load() -> DecodeKernel | None:
    """The kernel, built if need be; None (with one line on stderr saying why) where it cannot be had."""
    if os.environ.get(DISABLE_ENV) == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        print("hexgen: no C compiler found; CPU decodes take the gather path", file=sys.stderr)
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        flags = " ".join(COMPILE_FLAGS + LINK_FLAGS + LIBRARIES)
        key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, flags, _cpu_signature()]).encode())
        target = cache_root() / "kernels" / f"paged_decode-{key.hexdigest()[:16]}.so"
        if not target.is_file():
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        print(f"hexgen: the CPU decode kernel did not build ({detail.strip().splitlines()[-1] if detail else err}); "
              "CPU decodes take the gather path", file=sys.stderr)
        return None
    for name in ("paged_decode_f32", "paged_decode_bf16"):
        function = getattr(library, name)
        function.argtypes, function.restype = _ARGTYPES, None
    limits = []
    for what in ("max_group", "max_head_dim", "max_block_size", "head_dim_multiple"):
        function = getattr(library, f"paged_decode_{what}")
        function.argtypes, function.restype = [], ctypes.c_int64
        limits.append(function())
    return DecodeKernel(library, Limits(*limits))


def decode_kernel_for(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                      block_size: int) -> DecodeKernel | None:
    """The kernel for a CPU rank's decodes of this shape, or None (another device, a shape past its limits, or
    no kernel to be had: the gather path)."""
    if device.type != "cpu":
        return None
    kernel = load()
    if kernel is None or not kernel.supports(dtype, heads // kv_heads, head_dim, block_size):
        return None
    return kernel
