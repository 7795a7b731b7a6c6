"""`hexgen node start` cut short while it waits for Ray (up to 90 s): Ctrl-C or SIGTERM stops what it started,
and a start killed outright leaves a record that `hexgen node stop` finds. Ray itself is replaced by a stand-in that
never reports it started, so no network or Ray is involved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STAND_IN = """import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(600)
"""


@pytest.fixture
def stand_ins():
    """Pids of stand-in Rays, killed at the end whatever the test found."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _start(tmp_path: Path, machine: str) -> tuple[subprocess.Popen, Path]:
    """`hexgen node start --head` with `ray` replaced by the stand-in; returns the CLI and the stand-in's pid file."""
    pid_file = tmp_path / f"{machine}.pid"
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    ray = tmp_path / "ray"
    ray.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'stand_in.py'} {pid_file}\n")
    ray.chmod(0o755)
    # Ctrl-C as in a terminal: SIGINT at its default (Python's KeyboardInterrupt) and not blocked, whatever this
    # test process inherited (a shell's background job ignores SIGINT, and exec keeps an ignored signal ignored)
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM]); "
            f"import hexgen.raycluster.node as n; n._ray_executable = lambda: {str(ray)!r}; "
            f"from hexgen.cli import main; raise SystemExit(main(['node', 'start', '--head', '--machine', "
            f"{machine!r}, '--slots', '1']))")
    env = {**os.environ, "HOME": str(tmp_path), "HEXGEN_STATE_DIR": str(tmp_path / "state"),
           "RAY_AUTH_TOKEN": "0" * 64}
    cli = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert cli.poll() is None, cli.stderr.read()
        assert time.monotonic() < deadline, "the stand-in never started"
        time.sleep(0.05)
    return cli, pid_file


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_start_stops_what_it_started(tmp_path, signum, stand_ins):
    cli, pid_file = _start(tmp_path, f"m-{signum}")
    ray_pid = int(pid_file.read_text())
    stand_ins.append(ray_pid)
    time.sleep(0.5)  # inside the wait for Ray's "started" line
    cli.send_signal(signum)
    assert cli.wait(timeout=30) == 130
    assert "hexgen node start: interrupted" in cli.stderr.read()
    deadline = time.monotonic() + 15
    while _alive(ray_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(ray_pid), "the stand-in Ray was left running"
    assert list((tmp_path / "state" / "nodes").glob("*.json")) == []


def test_a_start_killed_outright_is_found_by_node_stop(tmp_path, stand_ins):
    cli, pid_file = _start(tmp_path, "m-killed")
    ray_pid = int(pid_file.read_text())
    stand_ins.append(ray_pid)
    cli.kill()
    cli.wait(timeout=30)
    assert _alive(ray_pid)  # nothing could stop it: SIGKILL
    env = {**os.environ, "HOME": str(tmp_path), "HEXGEN_STATE_DIR": str(tmp_path / "state")}
    out = subprocess.run([sys.executable, "-m", "hexgen.cli", "node", "stop"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "stopped m-killed" in out.stdout, out.stderr
    assert not _alive(ray_pid)


def test_a_state_folder_that_cannot_be_made_is_named(tmp_path):
    """HEXGEN_STATE_DIR under a file crashed `hexgen node stop` with a FileNotFoundError traceback."""
    (tmp_path / "a-file").write_text("")
    env = {**os.environ, "HOME": str(tmp_path), "HEXGEN_STATE_DIR": str(tmp_path / "a-file")}
    out = subprocess.run([sys.executable, "-m", "hexgen.cli", "node", "stop"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == (f"hexgen node stop: error: cannot make the folder of node records {tmp_path}/a-file/nodes "
                          "(Not a directory); set HEXGEN_STATE_DIR to a folder this user can write\n")
