"""Once keep_freed_memory has run, a tensor allocated and freed again and again reuses the same heap pages: the
kernel faults in none of them once the heap has grown to hold it (after two rounds). The same loop without it, in
a process of its own too, is the control: glibc then maps every block above 32 MiB afresh (its mmap threshold
never rises above that), so each round faults its pages in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

ROUNDS = 6
SCRIPT = """
import sys, torch
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
def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
counts = []
for _ in range({rounds}):
    before = faults()
    block = torch.ones(16 * 2**20)  # 64 MiB, every page written
    del block
    counts.append(faults() - before)
print(sum(counts[2:]))  # the heap may still grow in the first two
"""


def faults_after_two_rounds(mode: str) -> int:
    """Minor page faults of rounds 3-6 in a fresh process; mode: "keep", "default" or a model folder."""
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(rounds=ROUNDS), mode], capture_output=True,
                          text=True, timeout=120, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults in /proc (Linux, glibc)")
def test_freed_tensors_reuse_heap_pages():
    kept = faults_after_two_rounds("keep")
    default = faults_after_two_rounds("default")
    assert kept < 50, f"{kept} page faults in {ROUNDS - 2} rounds with the heap kept"
    assert default > 4 * max(kept, 10), f"the control faulted only {default} times: the test cannot tell them apart"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults in /proc (Linux, glibc)")
def test_a_cpu_rank_keeps_its_heap_once_built(tiny_model_dirs):
    folder = str(next(iter(tiny_model_dirs.values())))
    assert faults_after_two_rounds(folder) < 50
