"""Process entry that imports the engine (and torch) only inside the worker, keeping parents torch-free."""

from __future__ import annotations

import os
import signal
from typing import Any


def run_rank(*args: Any) -> None:
    """A rank's whole life. Ctrl-C in a terminal signals the whole foreground process group: the parent (CLI,
    server or node agent) owns it and stops its ranks in order (a shutdown message, then terminate, then kill),
    so a rank ignores SIGINT rather than dying mid-collective with a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args[0].spin_count:  # args[0] is the RankSpec; see launch/spec.py:omp_spin_count
        os.environ.setdefault("GOMP_SPINCOUNT", str(args[0].spin_count))  # before torch (and libgomp) loads
    from hexgen.engine.worker import rank_main

    rank_main(*args)
