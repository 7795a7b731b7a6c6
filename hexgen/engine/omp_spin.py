"""The OpenMP spin count of a process that runs engines in-process, alone on the machine (`hexgen bench engine`).

Its own module so that the commands stay torch-free: importing this loads nothing; calling it loads torch.
"""

from __future__ import annotations

import os
import sys


def spin_like_a_lone_rank() -> None:
    """The engines timed in this process run alone on the machine, as a one-rank `hexgen serve` does: their OpenMP
    threads spin at barriers for that rank's count (launch/spec.py:ALONE_SPIN_COUNT) instead of sleeping at once
    (hexgen.engine's default, which costs every parallel region a wake-up: HF's many small ops most). libgomp reads
    GOMP_SPINCOUNT once, when torch loads; the variable is then removed again, so that the ranks of the --layout
    runs, spawned from there, get their own (launch/entry.py). A user's own GOMP_SPINCOUNT is left alone.

    Measured on the 2-core Sapphire Rapids Xeon, SmolLM2-135M, batch-1 decode ms/token, sleeping -> spinning:
    hexgen fp32 46.8 -> 31.8, bf16 40.2 -> 21.5; HF generate fp32 55.2 -> 32.1, bf16 59.2 -> 33.1."""
    if "GOMP_SPINCOUNT" in os.environ or "torch" in sys.modules:
        return
    from hexgen.launch.spec import ALONE_SPIN_COUNT

    os.environ["GOMP_SPINCOUNT"] = str(ALONE_SPIN_COUNT)
    import torch  # noqa: F401  (loads libgomp, which reads the variable now)

    del os.environ["GOMP_SPINCOUNT"]
