"""Argument types shared by the sub-commands: argparse answers a bad value with a one-line error naming the flag."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def finite_float(text: str) -> float:
    """A float that is a number (argparse's float takes 'nan' and 'inf', which no hexgen flag means)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def request_rate(text: str) -> float:
    """--rate of `hexgen plan` and `hexgen simulate`: requests per second, above 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0 req/s, got {value:g}")
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


def output_file(text: str) -> str:
    """A file a command writes when it ends (a plan, a profile, a report): checked when the flags are read, so a
    path that cannot be written is refused before minutes of work, not after them."""
    path = Path(text)
    folder = path.parent
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got an empty one")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file name")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {folder} does not exist")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write there (permission denied)")
    return text


def model_name(text: str) -> str:
    """--model: a preset name, a folder or a file; an empty value would otherwise be read as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a model preset name, a folder or a file, got an empty value")
    return text
