"""Process entry that imports the engine (and torch) only inside the worker, keeping parents torch-free."""

from __future__ import annotations

import os
import signal
from typing import Any

# libgomp spin iterations at a barrier before a thread sleeps (about 2 ms; libgomp's default when no wait policy is
# set is 300000). For a rank alone on a CPU machine's cores, measured serving SmolLM2-135M on the 2-core EPYC, two
# runs each: 26.3 / 27.2 -> 27.7 / 28.2 tok/s at 1 stream and 194 / 197 -> 202 / 203 at 16 over sleeping at once
# (OMP_WAIT_POLICY=PASSIVE, hexgen/engine/__init__.py). Ranks that share the cores keep sleeping at once: spinning
# there made the default plan 122 -> 116 tok/s at 16 streams and the two-stage pipeline 24.3 -> 21.1 at 1.
ALONE_SPIN_COUNT = "200000"


def run_rank(*args: Any) -> None:
    """A rank's whole life. Ctrl-C in a terminal signals the whole foreground process group: the parent (CLI,
    server or node agent) owns it and stops its ranks in order (a shutdown message, then terminate, then kill),
    so a rank ignores SIGINT rather than dying mid-collective with a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args[0].spin_wait:  # args[0] is the RankSpec
        os.environ.setdefault("GOMP_SPINCOUNT", ALONE_SPIN_COUNT)  # before torch (and libgomp) loads
    from hexgen.engine.worker import rank_main

    rank_main(*args)
