"""The CPU attention kernel (`csrc/paged_attention.c`): built with the machine's C compiler at first use, cached,
loaded with ctypes, and called once a layer on a step's sequences instead of the gather path where it can.

The gather path copies every sequence's keys and values out of the pool before SDPA or two batched matmuls read the
copy; the kernel walks the block tables and reads the pool in place, one (task, KV head) pair per OpenMP task: a
task is a decode's one token, or a tile of up to `tile_rows / group` consecutive tokens of a longer chunk, whose
queries share each key they read. Built for AVX-512 (16-float vectors) or AVX2 (8), it takes whole steps alike
(README, "A CPU attention kernel of our own"). It runs on the libgomp torch has loaded (the same soname, so one
thread pool, the one `turns.py` releases).

Built with `-march=native`, so the shared object is cached per source, compiler, flags and CPU (the key hashes all
four) under $HEXGEN_CACHE_DIR/kernels (else ~/.cache/hexgen/kernels); it is written to a temporary name and
renamed, so ranks building at once do not clash. Where there is no compiler, the build fails or
HEXGEN_CPU_ATTENTION_KERNEL=0 is set, attention takes the gather path (which also stays as the tests' second
opinion).
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
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import torch

from hexgen.engine.checkpoint import cache_root

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
DISABLE_ENV = "HEXGEN_CPU_ATTENTION_KERNEL"  # "0": never use the kernel
PROFILE_NAME = "hexgen::paged_attention"  # the kernel's calls under torch.profiler
# Fast math only when compiling (vectorised expf, reassociated sums); the link step has no -ffast-math, because
# gcc would then link crtfastmath.o, whose constructor flushes denormals process-wide when the object is loaded.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11")
LINK_FLAGS = ("-shared", "-fopenmp")
LIBRARIES = ("-lm",)  # after the object: libm brings libmvec, the vector expf
_ARGTYPES = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
              ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int64])


@dataclass(frozen=True)
class Limits:
    max_group: int
    max_head_dim: int
    max_block_size: int
    head_dim_multiple: int  # a head's size must be a multiple of it
    tile_rows: int  # query rows (tokens x group) of one tile
    bf16_dot_products: bool  # bf16 tiles multiply two bf16 at a time into fp32 (AVX512_BF16)
    vector_width: int  # floats in a tile's vectors: 16 with AVX-512, else 8


@dataclass(frozen=True)
class AttentionKernel:
    library: ctypes.CDLL
    limits: Limits
    group: int = 1  # query heads per KV head of the rank it serves (`attention_kernel_for`): a tile's tokens

    def supports(self, dtype: torch.dtype, group: int, head_dim: int, block_size: int) -> bool:
        return (dtype in (torch.float32, torch.bfloat16) and group <= self.limits.max_group
                and head_dim <= self.limits.max_head_dim and head_dim % self.limits.head_dim_multiple == 0
                and block_size <= self.limits.max_block_size)

    @property
    def tile_tokens(self) -> int:
        """Tokens of a sequence that one task attends together (a tile: its query rows are that many tokens' query
        heads)."""
        return max(1, self.limits.tile_rows // self.group)

    def __call__(self, q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, tasks: torch.Tensor,
                 kv_heads: int, block_size: int, scale: float) -> torch.Tensor:
        """q [n, h, d] (each token's heads contiguous: a view into the step's fused projection will do) attending
        over a head-major pool [blocks, 2 kv_heads * block_size * d] -> [n, h, d]. tasks [t, 4] (`Task` rows,
        int64, on the host) cover the n tokens; a task's sequence is a row of block_tables [b, max_blocks]."""
        tokens, heads, head_dim = q.shape
        assert q.stride(2) == 1 and (heads == 1 or q.stride(1) == head_dim), "a token's heads must be contiguous"
        out = torch.empty((tokens, heads, head_dim), dtype=q.dtype)
        function = (self.library.paged_attention_bf16 if q.dtype == torch.bfloat16
                    else self.library.paged_attention_f32)
        # one op of its own under torch.profiler (`hexgen bench engine`'s CPU step profile); nothing otherwise
        profiled = torch.autograd.profiler._is_profiler_enabled
        with torch.profiler.record_function(PROFILE_NAME) if profiled else nullcontext():
            function(q.data_ptr(), q.stride(0), pool.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
                     tasks.data_ptr(), tasks.shape[0], out.data_ptr(), kv_heads, heads // kv_heads, head_dim,
                     block_size, scale, torch.get_num_threads())
        return out


@dataclass(frozen=True)
class Task:
    """Consecutive query tokens of one sequence that the kernel attends together, for every KV head."""

    first_row: int  # the first token's row in the kernel's q
    tokens: int
    sequence: int  # its row of the block tables
    position: int  # the first token's position: token i sees its sequence's keys 0 .. position + i


def split_tasks(lengths: list[int], positions: list[int], tile_tokens: int) -> torch.Tensor:
    """The tasks [t, 4] int64 (`Task` rows) for sequences bringing lengths[b] tokens from positions[b] on, their
    tokens packed in order: each sequence in tiles of up to `tile_tokens` tokens (1: every token a task of its own).
    The costliest (tokens x keys) first, so the kernel's threads, taking tasks in turn, end together."""
    tasks, row = [], 0
    for b, (n, start) in enumerate(zip(lengths, positions, strict=True)):
        tasks += [Task(row + i, min(tile_tokens, n - i), b, start + i) for i in range(0, n, tile_tokens)]
        row += n
    tasks.sort(key=lambda t: -t.tokens * (t.position + t.tokens))
    return torch.tensor([[t.first_row, t.tokens, t.sequence, t.position] for t in tasks], dtype=torch.int64)


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


def _build(compiler: str, target: Path, compile_flags: tuple[str, ...]) -> None:
    """Compile then link into `target` (atomically: a temporary name in the same folder, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        obj, lib = Path(scratch) / "paged_attention.o", Path(scratch) / target.name
        subprocess.run([compiler, *compile_flags, "-c", str(SOURCE), "-o", str(obj)], check=True,
                       capture_output=True, text=True)
        subprocess.run([compiler, *LINK_FLAGS, str(obj), "-o", str(lib), *LIBRARIES], check=True, capture_output=True,
                       text=True)
        os.replace(lib, target)


@cache
def load(extra_flags: tuple[str, ...] = ()) -> AttentionKernel | None:
    """The kernel, built if need be (`extra_flags` after the compile flags: the tests build it without AVX-512 or
    AVX512_BF16 too); None (with one line on stderr saying why) where it cannot be had."""
    if os.environ.get(DISABLE_ENV) == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        print("hexgen: no C compiler found; CPU attention takes the gather path", file=sys.stderr)
        return None
    compile_flags = COMPILE_FLAGS + extra_flags
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        flags = " ".join(compile_flags + LINK_FLAGS + LIBRARIES)
        key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, flags, _cpu_signature()]).encode())
        target = cache_root() / "kernels" / f"paged_attention-{key.hexdigest()[:16]}.so"
        if not target.is_file():
            _build(compiler, target, compile_flags)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        print(f"hexgen: the CPU attention kernel did not build ({detail.strip().splitlines()[-1] if detail else err}); "
              "CPU attention takes the gather path", file=sys.stderr)
        return None
    for name in ("paged_attention_f32", "paged_attention_bf16"):
        function = getattr(library, name)
        function.argtypes, function.restype = _ARGTYPES, None
    limits = []
    for what in ("max_group", "max_head_dim", "max_block_size", "head_dim_multiple", "tile_rows",
                 "bf16_dot_products", "vector_width"):
        function = getattr(library, f"paged_attention_{what}")
        function.argtypes, function.restype = [], ctypes.c_int64
        limits.append(function())
    limits[5] = bool(limits[5])
    return AttentionKernel(library, Limits(*limits))


def attention_kernel_for(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                         block_size: int) -> AttentionKernel | None:
    """The kernel for a CPU rank's attention of this shape, or None (another device, a shape past its limits, or
    no kernel to be had: the gather path)."""
    if device.type != "cpu":
        return None
    kernel = load()
    if kernel is None or not kernel.supports(dtype, heads // kv_heads, head_dim, block_size):
        return None
    return replace(kernel, group=heads // kv_heads)
