"""Process entry that imports the engine (and torch) only inside the worker, keeping parents torch-free."""

from __future__ import annotations

import os
import signal
from typing import Any


def rank_environment(spec: Any) -> dict[str, str]:
    """Variables a rank's process must have before torch loads (spec: its RankSpec): its OpenMP spin count
    (launch/spec.py:omp_spin_count), unless the user set one. libgomp reads it once, when it loads; a spawned rank
    may load torch before run_rank starts (while unpickling its arguments, when the parent's main module imports
    torch), so the parent starts each rank with these set (launch/local.py:RankProcesses), and run_rank sets them
    again for starters that do not."""
    if not spec.spin_count or "GOMP_SPINCOUNT" in os.environ:
        return {}
    return {"GOMP_SPINCOUNT": str(spec.spin_count)}


def run_rank(*args: Any) -> None:
    """A rank's whole life. Ctrl-C in a terminal signals the whole foreground process group: the parent (CLI,
    server or node agent) owns it and stops its ranks in order (a shutdown message, then terminate, then kill),
    so a rank ignores SIGINT rather than dying mid-collective with a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name, value in rank_environment(args[0]).items():  # args[0] is the RankSpec
        os.environ.setdefault(name, value)  # before torch (and libgomp) loads, where it has not loaded yet
    from hexgen.engine.worker import rank_main

    rank_main(*args)
