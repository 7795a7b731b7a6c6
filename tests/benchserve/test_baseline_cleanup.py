"""scripts/baselines/common.sh:run_server stops its server's process group and removes the torch shared-memory
segments (/dev/shm/psm_*) that appeared while it ran, keeping those that were there before."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[2] / "scripts" / "baselines" / "common.sh"
SHM = Path("/dev/shm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not SHM.is_dir() or shutil.which("curl") is None, reason="needs /dev/shm and curl")
def test_a_stopped_server_leaves_no_process_and_no_new_segment(tmp_path):
    tag = uuid.uuid4().hex[:8]
    before, left = SHM / f"psm_{tag}_before", SHM / f"psm_{tag}_left"
    before.write_bytes(b"x")  # someone else's segment: kept
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text("{}")  # what wait_ready polls
    port, ready = free_port(), tmp_path / "ready"
    # a "server" that leaves a segment behind, then answers on loopback until killed
    server = (f"touch {left}; exec {sys.executable} -m http.server {port} --bind 127.0.0.1 "
              f"--directory {tmp_path}")
    script = f'set -euo pipefail; source "{COMMON}"; PORT={port}; run_server "{tmp_path}/log" bash -c "{server}"'
    starter = subprocess.Popen(["bash", "-c", script], env={**os.environ, "BASELINE_READY_FILE": str(ready)})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert starter.poll() is None and time.monotonic() < deadline, "the fake server did not come up"
            time.sleep(0.2)
        assert left.exists()
        starter.send_signal(signal.SIGTERM)
        assert starter.wait(timeout=30) == 0
        assert not left.exists() and before.exists()
        with socket.socket() as s:  # nothing listens on the port any more
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if starter.poll() is None:
            starter.kill()
        before.unlink(missing_ok=True)
        left.unlink(missing_ok=True)
