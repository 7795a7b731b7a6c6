"""Helpers of the Ray tests: the hexgen CLI as a subprocess, a `hexgen serve --ray` server, the greedy reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
HEXGEN = str(REPO_ROOT / ".venv" / "bin" / "hexgen")
HEAD = "127.0.0.1:6379"
# machine -> (node address, slots); the head is machine "a" (the serving process runs on it)
MACHINES = {"a": ("127.0.0.1", 2), "b": ("127.0.0.2", 1), "c": ("127.0.0.3", 2)}


def hexgen(*args: str, timeout_s: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([HEXGEN, *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT)
    if check:
        assert done.returncode == 0, f"hexgen {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def rank_actor_pids() -> list[int]:
    """Processes that are (or were) a hexgen rank actor: Ray names its worker process after the actor class."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::RankActor") and \
                        (entry / "stat").read_text().split(") ")[1][0] != "Z":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def write_plan(path: Path, model: Path | str, replicas: list[list[tuple[str, int, tuple[int, int]]]]) -> Path:
    """A plan for `model`: replicas -> stages of (machine, GPU index, (first layer, end layer)), all TP 1."""
    data = {"model": str(model), "replicas": [
        {"stages": [{"machine": m, "gpus": [g], "tp": 1, "layers": list(lay)} for m, g, lay in stages]}
        for stages in replicas]}
    path.write_text(json.dumps(data))
    return path


class RayServer:
    """`hexgen serve --ray` in its own session; `stop()` checks that it and every rank actor are gone."""

    def __init__(self, model_dir: Path, plan: Path, log_path: Path, *args: str, port: int = 8123):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        cmd = [HEXGEN, "serve", "--model", str(model_dir), "--plan", str(plan), "--ray", HEAD, "--port", str(port),
               "--max-context", "64", *args]
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while "ready on" not in self.log():
            assert self.proc.poll() is None, f"hexgen serve exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"hexgen serve not ready after {timeout_s} s:\n{self.log()}"
            time.sleep(0.2)

    def status(self) -> dict:
        response = httpx.get(self.url + "/status", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def complete(self, prompt: str, max_tokens: int) -> httpx.Response:
        body = {"model": self.status()["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        return httpx.post(self.url + "/v1/completions", json=body, timeout=60)

    def wait_for(self, predicate, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if predicate(status):
                return status
            assert time.monotonic() < deadline, f"not {what} after {timeout_s} s: {status['replicas']}\n{self.log()}"
            time.sleep(0.25)

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    raise AssertionError(f"hexgen serve ignored SIGINT for 30 s:\n{self.log()}") from None
            deadline = time.monotonic() + 20
            while rank_actor_pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not rank_actor_pids(), "rank actors left after hexgen serve stopped"
            assert "Traceback" not in self.log(), self.log()
        finally:
            self._log.close()
