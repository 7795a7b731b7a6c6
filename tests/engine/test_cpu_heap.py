"""Once keep_freed_memory has run, a 64 MiB block malloc'd, written and freed again and again reuses the same heap
pages: the kernel faults in none of them after the first round. The same loop without it, in a process of its own
too, is the control: glibc then maps every block above 32 MiB afresh (its mmap threshold never rises above that), so
every round faults its pages in again (all 16,384 of them, or 32 huge pages where transparent huge pages are always
on).

The blocks come from malloc itself (ctypes), not from torch: torch asks for 64-byte aligned blocks, which need a
free chunk a little larger than the block, so a torch tensor freed and asked for again may grow the heap a few
times over before the holes it leaves merge (1-16 rounds for 64 MiB here), and a count of its faults says more about
glibc's bins than about the thresholds this module sets."""

from __future__ import annotations

import subprocess
import sys

import pytest

ROUNDS = 6
BLOCK_PAGES = 16 * 1024  # 64 MiB in 4 KiB pages
SCRIPT = """
import ctypes, sys
from hexgen.engine.cpu_heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
elif sys.argv[1] != "default":  # a model folder: a CPU rank built from it must have kept its heap itself
    from hexgen.engine.checkpoint import resolve_model
    from hexgen.engine.engine import build_runner, init_rank
    from hexgen.engine.scheduler import SchedulerConfig
    from hexgen.launch.spec import Layout, RankSpec
    source = resolve_model(sys.argv[1])
    spec = RankSpec(source, Layout((1,), ((0, source.spec.num_layers),)), 0)
    build_runner(spec, init_rank(spec), SchedulerConfig(max_context=64))
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def faults():
    with open("/proc/self/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])
size = {pages} * 4096
counts = []
for _ in range({rounds}):
    before = faults()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # every page written
    libc.free(block)
    counts.append(faults() - before)
print(*counts[1:])  # the first round grows the heap
"""


def faults_after_first_round(mode: str) -> list[int]:
    """Minor page faults of rounds 2-6, round by round, in a fresh process; mode: "keep", "default" or a model
    folder."""
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(rounds=ROUNDS, pages=BLOCK_PAGES), mode],
                          capture_output=True, text=True, timeout=120, check=True)
    return [int(count) for count in done.stdout.split()]


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults in /proc (glibc)")


@linux_only
def test_freed_blocks_reuse_heap_pages():
    assert sum(faults_after_first_round("keep")) < 50


@linux_only
def test_without_it_every_round_faults_its_block_in_again():
    default = faults_after_first_round("default")
    assert len(default) == ROUNDS - 1 and min(default) > 0, f"faults round by round: {default}"


@linux_only
def test_a_cpu_rank_keeps_its_heap_once_built(tiny_model_dirs):
    folder = str(next(iter(tiny_model_dirs.values())))
    assert sum(faults_after_first_round(folder)) < 50
