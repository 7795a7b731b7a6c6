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
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(rounds=ROUNDS), mode], capture_output=True,
                          text=True, timeout=120, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults in /proc (Linux, glibc)")
def test_freed_tensors_reuse_heap_pages():
    kept = faults_after_two_rounds("keep")
    default = faults_after_two_rounds("default")
    assert kept < 50, f"{kept} page faults in {ROUNDS - 2} rounds with the heap kept"
    assert default > 4 * max(kept, 10), f"the control faulted only {default} times: the test cannot tell them apart"
