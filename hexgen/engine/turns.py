"""A CPU rank whose stage takes turns with the other stages on its machine's cores ends each turn by releasing its
OpenMP worker threads, so that they leave the cores to the next stage at once.

A stage's layers run their parallel regions on libgomp's threads, which spin GOMP_SPINCOUNT iterations at every
barrier before they sleep. Inside a turn they should spin long: a worker that sleeps between two regions costs the
next one a wake-up (on the 2-core Sapphire Rapids Xeon, stages spinning 10,000 iterations, ~130 µs, slept ~18 times
a turn of 15 SmolLM2 layers). At the end of a turn they should not spin at all: a worker spinning on past its
stage's turn holds a core the next stage's threads need. libgomp offers no call that puts its threads to sleep, but
`omp_pause_resource_all` (OpenMP 5.0) ends them, and the next parallel region starts them afresh (tens of µs). So a
rank that takes turns spins like a lone rank (launch/spec.py:omp_spin_count) and calls `release_worker_threads`
once it has handed its micro-batch on, before it waits for the next.

Measured on that Xeon, `hexgen serve` of SmolLM2-135M fp32 as a two-stage pipeline TP 1 | TP 1 at 16 streams,
three rounds alternating with the same server without it: 241.3 tok/s (243.5 / 240.2 / 240.3) against 230.5
(239.3 / 224.7 / 227.5); one process served 272.3 in the same rounds.

The release comes after the hand-off, not before it, although it then overlaps the next stage's first layers (it
waits for the rank's workers to get a core, 3.5-4.5 ms there, timed inside the ranks): releasing first, so that the
next stage starts on quiet cores, made the release 0.2 ms but served less, 225.8 tok/s against 240.9 (three paired
rounds, 2026-12-01; with only the last stage releasing first, 228.1 against 239.9). Traced (tracefs sched_switch,
one stream): releasing first, the next turn's new worker thread was mostly started on the vCPU of the thread that
made it while the other vCPU idled (that VM's guest kernel packs threads), so 37% of a stage's forward ran on one
core against 14% with the release overlapping, whose spinning keeps the other vCPU busy; binding the threads to
cores (GOMP_CPU_AFFINITY) served less either way (219-223 tok/s at 16 streams). Plain torch taking turns does
better releasing first (scripts/bench_turn_taking.py: 3.9-7.9% a step over one process, against 8.5-16.0% with
--release-after, four rounds each), so the order is that VM's, not a law: measure again on other machines.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free what the runtime rebuilds by itself at the next parallel region


def _pause_all() -> Callable[[int], int] | None:
    """omp_pause_resource_all of the libgomp torch has loaded, or None where none is loaded (a torch built with
    another OpenMP runtime, or torch not imported yet): RTLD_NOLOAD never loads a second copy."""
    try:
        library = ctypes.CDLL("libgomp.so.1", mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
        pause = library.omp_pause_resource_all
    except (OSError, AttributeError):
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


_pause: Callable[[int], int] | None = None  # once found (looked up again until then)


def release_worker_threads() -> bool:
    """End this process's idle OpenMP worker threads (the next parallel region starts new ones); whether libgomp
    did. Call between parallel regions only, from the thread that runs them."""
    global _pause
    if _pause is None:
        _pause = _pause_all()
    return _pause is not None and _pause(OMP_PAUSE_SOFT) == 0
