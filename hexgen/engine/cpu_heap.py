"""A CPU rank's step-time tensors on heap pages it keeps, instead of pages the kernel maps, faults in and zeroes
again and again.

glibc's malloc serves a request above its mmap threshold (128 KiB at first; each free of a mapped block raises it
to that block's size, up to 32 MiB) with a mapping of its own, and hands the free top of its heap back to the
kernel once more than its trim threshold (twice the mmap threshold) is free. A decode step allocates and frees
tensors of every size from a few bytes to megabytes (activations, gathered KV blocks, logits), so a rank's steps land
on pages the kernel must fault in and zero again until glibc's thresholds have adapted to them, and for ever for
blocks above 32 MiB (a long prefill chunk's MLP activations on a larger model). Measured on SmolLM2-135M at 16
sequences (2-core Xeon, minor faults in `/proc`): a fresh rank took 700-1,000 faults a step over its first 130
steps, a server warmed by a few hundred steps about 3. Once a rank's weights and KV pool are in place
(engine.build_runner), both thresholds are raised to HEAP_KEEP_BYTES, so a step reuses what the steps before it
freed from the start: about 50 faults a step over those first 130 steps (the heap still growing with its
sequences' context), and 2-7% more tokens per second for the fresh engine, one process or a two-stage pipeline
(paired runs of 32 requests); the warmed server served the same either way (281.4 against 276.9 tok/s). The weights
and the KV pool keep the mappings they were allocated with. What the heap keeps beyond them is a step's peak of
temporaries and the holes between them: torch asks for 64-byte aligned blocks, which need a free chunk a little
larger than the block, so a large tensor freed and asked for again can grow the heap by its size a few times before
the holes it left merge (a lone 64 MiB tensor in a loop: 1 to 16 rounds on that Xeon). Elsewhere (not glibc) this is
a no-op.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
HEAP_KEEP_BYTES = 1 << 30  # allocations below this come from the heap; free memory up to this stays in it


def keep_freed_memory() -> bool:
    """Raise malloc's mmap and trim thresholds to HEAP_KEEP_BYTES for this process; whether the C library took
    both (False where there is no mallopt, as on macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_KEEP_BYTES))
