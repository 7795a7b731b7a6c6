"""Process entry that imports the engine (and torch) only inside the worker, keeping parents torch-free."""

from __future__ import annotations

import signal
from typing import Any


def run_rank(*args: Any) -> None:
    """A rank's whole life. Ctrl-C in a terminal signals the whole foreground process group: the parent (CLI,
    server or node agent) owns it and stops its ranks in order (a shutdown message, then terminate, then kill),
    so a rank ignores SIGINT rather than dying mid-collective with a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from hexgen.engine.worker import rank_main

    rank_main(*args)
