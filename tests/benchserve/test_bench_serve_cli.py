"""`hexgen bench serve` end to end over real HTTP (a fake SSE server on loopback), and its bad-flag errors."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from hexgen.cli import main


def fake_app(tokens: int, gap_s: float) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake"}]}

    @app.post("/v1/completions")
    async def completions():
        async def events():
            for i in range(tokens):
                await asyncio.sleep(gap_s)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f' w{i}'}]})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake_app(tokens=4, gap_s=0.02), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def test_cli_runs_against_a_real_http_server_and_saves_json(fake_url, tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = main(["bench", "serve", "--url", fake_url, "--model", "fake", "--concurrency", "2", "--num-requests", "6",
               "--max-tokens", "4", "--slo-ttft-s", "5", "--json", str(out)])
    assert rc == 0
    assert "output tokens/s" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["summary"]["completed"] == 6 and saved["summary"]["tokens_source"] == "chunks"
    assert saved["summary"]["slo_attainment"] == 1.0
    assert all(r["output_tokens"] == 4 and r["tpot_s"] > 0 for r in saved["requests"])


@pytest.mark.parametrize("flags, message", [
    (["--concurrency", "2", "--rate", "1"], "exactly one of --concurrency N"),
    (["--concurrency", "0"], "--concurrency 0: must be an integer >= 1"),
    (["--rate", "0"], "--rate 0.0: must be a number of requests per second > 0"),
    (["--num-requests", "5", "--duration-s", "3"], "exactly one of --num-requests N and --duration-s S"),
    (["--max-tokens", "0"], "--max-tokens 0: must be >= 1"),
    (["--slo-tpot-s", "-1"], "--slo-tpot-s -1.0: must be a positive number of seconds"),
    (["--url", "127.0.0.1:8000"], "expected an http(s) URL"),
    (["--prompt", " "], "--prompt is empty"),
    (["--logprobs", "21"], "--logprobs 21: must be in 0..20"),
])
def test_bad_flags_say_what_is_right(flags, message, capsys):
    assert main(["bench", "serve", "--model", "m", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hexgen bench serve: error:") and message in err and err.count("\n") == 1


def test_bad_prompts_files_say_what_is_wrong(tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    cases = [(["--prompts-file", str(tmp_path / "missing.txt")], "cannot read --prompts-file"),
             (["--prompts-file", str(blank)], "no prompt in it"),
             (["--prompts-file", str(blank), "--prompt", "hi"], "one of --prompt and --prompts-file")]
    for flags, message in cases:
        assert main(["bench", "serve", "--model", "m", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hexgen bench serve: error:") and message in err and err.count("\n") == 1, err
