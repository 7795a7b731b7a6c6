"""Process entry that imports the engine (and torch) only inside the worker, keeping parents torch-free."""

from __future__ import annotations

from typing import Any


def run_rank(*args: Any) -> None:
    from hexgen.engine.worker import rank_main

    rank_main(*args)
