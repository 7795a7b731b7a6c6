"""scripts/bench_turn_taking.py at a tiny size: the two processes take their turns to the end (no deadlock, no
broken pipe: each of B's turns waits for A's, A's last turn is the pair's second-to-last) and the table has a row
per layer of a turn; bad sizes are refused by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_turn_taking.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("order", [[], ["--release-after"]])
def test_tiny_run_takes_every_turn(order):
    done = run("--steps", "6", "--layers", "4", "--batch", "2", "--context", "32", "--threads", "1", "--rounds", "1",
               *order)
    assert done.returncode == 0, done.stderr
    assert ("(after handing the turn on)" in done.stdout) is bool(order)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2"]  # 4 layers: 2 a turn
    times = [float(cell) for row in rows for cell in row.split("|")[2:5]]
    assert all(t > 0 for t in times)
    assert "round 1: one process" in done.stdout


def test_bad_sizes_name_the_flag():
    done = run("--layers", "3")
    assert done.returncode == 2
    assert "--layers must be even" in done.stderr
