"""Kernel tests run twice: on CPU tensors under Triton's interpreter, and (marked `gpu`) compiled on CUDA.

Triton reads TRITON_INTERPRET when a kernel is defined, so it is set before any kernel module is imported, and
only where no GPU is visible: a process either interprets or compiles, never both. tests/conftest.py sets it first
(other test modules may load triton at collection); the setdefault here covers running this folder alone.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
if HAS_TRITON and not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a kernel test runs on; skips what this machine cannot run, with the reason."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install -e '.[gpu]')")
    if request.param == "cpu":
        if HAS_CUDA:
            pytest.skip("CUDA is visible, so Triton compiles for it; the interpreter runs only without a GPU")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("TRITON_INTERPRET is set to something other than 1")
    return torch.device(request.param)
