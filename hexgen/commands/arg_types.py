"""Argument types shared by the sub-commands: argparse answers a bad value with a one-line error naming the flag."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A float that is a number (argparse's float takes 'nan' and 'inf', which no hexgen flag means)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


MAX_REQUESTS = 1_000_000  # simulated requests: ~10 minutes at ~0.6 ms each (2-core Xeon); a sweep runs them per rate


def request_count(text: str) -> int:
    """Requests to simulate (`hexgen simulate`, and per candidate plan in `hexgen plan`): 1 to MAX_REQUESTS."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of requests, got {text!r}") from None
    if not 1 <= value <= MAX_REQUESTS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_REQUESTS:,}, got {value}")
    return value
