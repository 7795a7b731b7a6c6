"""Helpers of the server tests: a `hexgen serve` subprocess, process-group scans, SSE and Prometheus parsing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]

EOS_PROMPT = "The quick brown fox"
EOS_AT = 4  # greedy continuation of EOS_PROMPT ends with EOS as its EOS_AT-th token
MAX_POSITIONS = 4096


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is pgid."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def sse_events(response: httpx.Response) -> list:
    """The data payloads of a streamed response, JSON-decoded except the final "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric_value(text: str, name: str, labels: str = "", default: float | None = None) -> float:
    """The value of one sample of Prometheus text, e.g. metric_value(t, "hexgen_replica_up", 'replica="0"')."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    if default is not None:
        return default
    raise KeyError(f"{wanted} not in the metrics")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`hexgen serve` in its own session; `stop()` asserts that the whole process group is gone."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        cmd = [
            str(REPO_ROOT / ".venv" / "bin" / "hexgen"),
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
        ]
        # the references the tests compare with are float32: not --dtype auto, which is bfloat16 on a CPU with bf16
        # arithmetic
        dtype = [] if any(a.startswith("--dtype") for a in args) else ["--dtype", "float32"]
        cmd += [*args, *dtype, *(["--api-key", api_key] if api_key else [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.ranks_seen: list[int] = []

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Wait for the 'ready on' line; at that moment every replica must already answer as up."""
        deadline = time.monotonic() + timeout_s
        while "ready on" not in self.log():
            assert self.proc.poll() is None, f"hexgen serve exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"hexgen serve not ready after {timeout_s} s:\n{self.log()}"
            time.sleep(0.1)
        for _ in range(50):  # uvicorn binds right after the line is printed
            try:
                health = httpx.get(self.url + "/health", timeout=5)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert health.status_code == 200
        status = self.status()
        assert [r["status"] for r in status["replicas"]] == ["up"] * len(status["replicas"])
        assert health.json()["replicas_up"] == len(status["replicas"])
        self.ranks_seen = self.rank_pids()

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=kwargs.pop("timeout", 30), **kwargs)

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=kwargs.pop("timeout", 60), **kwargs)

    def status(self) -> dict:
        response = self.get("/status")
        assert response.status_code == 200, response.text
        return response.json()

    def rank_pids(self) -> list[int]:
        """The server's multiprocessing spawn children (one per rank), in start order: replica 0's ranks first."""
        return sorted(
            pid
            for pid in group_members(self.proc.pid)
            if _ppid(pid) == self.proc.pid and b"spawn_main" in _cmdline(pid)
        )

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until no request is outstanding and no sequence runs on any replica that is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            replicas = [r for r in self.status()["replicas"] if r["status"] == "up"]
            if all(r["outstanding_requests"] == 0 and r["running"] == 0 and r["waiting"] == 0 for r in replicas):
                return
            assert time.monotonic() < deadline, f"server still busy after {timeout_s} s: {replicas}"
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGINT to the whole process group (as Ctrl-C in a terminal), then SIGTERM / SIGKILL of the group if
        needed; assert nothing is left and no process printed a traceback."""
        try:
            if self.proc.poll() is None:
                _signal_group(self.proc.pid, signal.SIGINT)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _signal_group(self.proc.pid, signal.SIGTERM)
                    try:
                        self.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        _signal_group(self.proc.pid, signal.SIGKILL)
                        self.proc.wait(timeout=5)
                    raise AssertionError(f"hexgen serve ignored SIGINT for 30 s:\n{self.log()}") from None
            deadline = time.monotonic() + 15
            while group_members(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            left = group_members(self.proc.pid)
            if left:
                _signal_group(self.proc.pid, signal.SIGKILL)
            assert not left, f"processes left after hexgen serve stopped: {[_cmdline(p)[:80] for p in left]}"
            assert "Traceback" not in self.log(), self.log()
        finally:
            self._log.close()


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    """The server once ready; stopped (and checked to have left nothing behind) however the block ends."""
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _ppid(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def write_plan(
    path: Path,
    model_dir: Path,
    replicas: list[list[tuple[list[int], tuple[int, int]]]],
    latencies_s: list[float] | None = None,
) -> Path:
    """A plan on machine 'localhost': replicas -> stages of (gpus, (first layer, end layer))."""
    data = {"model": str(model_dir), "replicas": []}
    for r, stages in enumerate(replicas):
        replica = {
            "stages": [{"machine": "localhost", "gpus": g, "tp": len(g), "layers": list(lay)} for g, lay in stages]
        }
        if latencies_s:
            replica["predicted"] = {"latency_s": latencies_s[r]}
        data["replicas"].append(replica)
    path.write_text(json.dumps(data))
    return path
