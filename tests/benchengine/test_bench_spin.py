"""`hexgen bench engine` on CPU loads torch with a lone rank's OpenMP spin count, then takes the variable back so
that the ranks it spawns choose their own; a user's own GOMP_SPINCOUNT is left as it is. Each case runs in a fresh
interpreter (torch must not be loaded yet)."""

from __future__ import annotations

import os
import subprocess
import sys

from hexgen.launch.spec import ALONE_SPIN_COUNT

PROBE = """
import builtins, os, sys
import hexgen.engine.omp_spin as bench
seen = []  # GOMP_SPINCOUNT at the moment torch is first imported
real_import = builtins.__import__
def spying_import(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        seen.append(os.environ.get("GOMP_SPINCOUNT"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = spying_import
bench.spin_like_a_lone_rank()
builtins.__import__ = real_import
print(seen, os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules)
"""


def probe(env_spin: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if env_spin is not None:
        env["GOMP_SPINCOUNT"] = env_spin
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_torch_loads_with_the_lone_rank_spin_count_and_the_variable_is_taken_back():
    assert probe(None) == f"['{ALONE_SPIN_COUNT}'] None True"


def test_a_users_own_spin_count_is_kept():
    assert probe("123") == "[] 123 False"
