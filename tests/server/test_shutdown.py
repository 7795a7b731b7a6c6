"""SIGTERM to `hexgen serve` with requests running: new requests get a 503, requests that finish within the drain
time finish, the others end with a 503 (a stream: an error event, then [DONE]); no traceback, nothing left."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
from serve_helpers import Server, serving, write_plan

from hexgen.server.coordinator import SHUTTING_DOWN

GRACE_S = 6.0


def test_sigterm_drains_then_ends_what_is_left_with_a_503(chat_model_dir, tmp_path):
    plan = write_plan(tmp_path / "plan.json", chat_model_dir, [[([0], (0, 4))]])  # one process
    server = Server(chat_model_dir, tmp_path / "serve.log", "--plan", str(plan), "--max-context", "4096",
                    "--shutdown-grace-s", str(GRACE_S))
    with serving(server):
        name = server.status()["model"]
        url = server.url + "/v1/completions"
        long = {"model": name, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True}

        async def stream(client: httpx.AsyncClient, started: asyncio.Event) -> list[str]:
            lines = []
            async with client.stream("POST", url, json={**long, "stream": True}) as response:
                async for line in response.aiter_lines():
                    if line:
                        lines.append(line)
                        started.set()
            return lines

        def outstanding() -> int:
            return sum(r["outstanding_requests"] for r in server.status()["replicas"])

        async def until(condition, timeout_s: float = 60.0) -> None:
            deadline = time.monotonic() + timeout_s
            while not condition():
                assert time.monotonic() < deadline, "the requests did not start"
                await asyncio.sleep(0.02)

        async def run() -> tuple:
            async with httpx.AsyncClient(timeout=60) as client:
                started = asyncio.Event()
                streamed = asyncio.create_task(stream(client, started))
                whole = asyncio.create_task(client.post(url, json=long))
                await asyncio.wait_for(started.wait(), timeout=60)
                await until(lambda: outstanding() == 2)
                # a few steps: done within the grace, even where other tests load the cores (a step of this model
                # then took up to 0.2 s here, its OpenMP threads waiting on each other)
                short = asyncio.create_task(client.post(url, json={**long, "max_tokens": 3}))
                await until(lambda: outstanding() == 3 or short.done())  # admitted before the signal
                os.kill(server.proc.pid, signal.SIGTERM)
                signalled = time.monotonic()
                try:
                    late = (await client.post(url, json={**long, "max_tokens": 2})).status_code
                except httpx.TransportError:
                    late = None  # the listening socket had already closed
                results = await asyncio.gather(streamed, whole, short)
                return (*results, late, time.monotonic() - signalled)

        lines, whole, short, late, took_s = asyncio.run(run())
        assert late in (503, None)
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
        assert whole.status_code == 503 and whole.json()["error"] == {
            "message": SHUTTING_DOWN, "type": "server_error", "param": None, "code": None}
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["message"] == SHUTTING_DOWN
        assert all("error" not in json.loads(line.removeprefix("data: ")) for line in lines[:-2])
        assert GRACE_S - 0.5 < took_s < GRACE_S + 5
        server.proc.wait(timeout=30)  # serving() then checks: no process left, no traceback
