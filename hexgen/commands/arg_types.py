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
