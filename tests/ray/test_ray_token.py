"""Ray's token authentication guards every cluster: `node start --head` prints the token (and keeps it in Ray's token
file on the head); another machine joining or probing without it, or with a wrong one, fails in one line. The head
uses a non-loopback address that lives on this namespace's loopback interface, so nothing leaves it."""

from __future__ import annotations

import re
import subprocess

import pytest
from ray_helpers import hexgen

HEAD_IP, NODE_IP, PORT = "10.99.0.1", "10.99.0.2", 6380


@pytest.fixture
def private_addresses():
    for ip in (HEAD_IP, NODE_IP):
        subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
    try:
        yield
    finally:
        hexgen("node", "stop", "--machine", "tb", check=False)
        hexgen("node", "stop", "--machine", "ta", check=False)
        for ip in (HEAD_IP, NODE_IP):
            subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], check=False)


def test_token_guards_the_cluster(private_addresses, tmp_path, monkeypatch):
    started = hexgen("node", "start", "--head", "--node-ip-address", HEAD_IP, "--port", str(PORT), "--machine", "ta",
                     "--slots", "1")
    token = re.search(r"RAY_AUTH_TOKEN=([0-9a-f]{64}) hexgen node join " + re.escape(f"{HEAD_IP}:{PORT}"),
                      started.stdout)
    assert token, started.stdout
    address = f"{HEAD_IP}:{PORT}"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))  # another machine: no token file
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    refused = hexgen("node", "join", address, "--machine", "tb", "--slots", "1", "--node-ip-address", NODE_IP,
                     check=False)
    assert refused.returncode == 2 and "RAY_AUTH_TOKEN" in refused.stderr
    out = str(tmp_path / "cluster.yaml")
    assert "RAY_AUTH_TOKEN" in hexgen("cluster", "probe", "--ray", address, "-o", out, check=False).stderr
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    wrong = hexgen("cluster", "probe", "--ray", address, "-o", out, check=False)
    assert wrong.returncode == 2 and "is RAY_AUTH_TOKEN the head's token?" in wrong.stderr.splitlines()[-1]
    monkeypatch.setenv("RAY_AUTH_TOKEN", token.group(1))
    hexgen("node", "join", address, "--machine", "tb", "--slots", "1", "--node-ip-address", NODE_IP)
    hexgen("cluster", "probe", "--ray", address, "-o", out, "--bulk-mib", "1")
    assert "name: tb" in (tmp_path / "cluster.yaml").read_text()
