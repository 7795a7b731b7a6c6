"""The load generator against a fake streaming server with controlled delays: timings, modes, payloads, errors."""

from __future__ import annotations

import json
import socket

import pytest
from fake_openai_server import FakeServer
from rich.console import Console

from hexgen.benchserve.config import BenchConfig
from hexgen.benchserve.loadgen import run_benchmark
from hexgen.benchserve.metrics import summarize
from hexgen.benchserve.report import render_table, write_json
from hexgen.errors import UserError

URL = "http://fake.test/v1"


def config(**overrides) -> BenchConfig:
    return BenchConfig(**{"base_url": URL, "model": "fake", "num_requests": 4, "warmup_requests": 0, **overrides})


def test_ttft_tpot_e2e_match_the_servers_delays():
    server = FakeServer(tokens=5, ttft_s=0.20, tpot_s=0.05)
    run = run_benchmark(config(num_requests=3, warmup_requests=1), transport=server.transport())
    assert len(server.payloads) == 4  # the warm-up request was sent but is not measured
    assert len(run.requests) == 3
    for r in run.requests:
        assert r.is_ok and r.output_tokens == 5 and r.tokens_source == "usage"
        assert r.ttft_s == pytest.approx(0.20, abs=0.06)
        assert r.tpot_s == pytest.approx(0.05, abs=0.02)
        assert r.e2e_s == pytest.approx(0.40, abs=0.10)
    summary = summarize(run)
    assert summary.completed == 3 and summary.failed == 0 and summary.output_tokens == 15
    assert summary.output_throughput_tps == pytest.approx(15 / run.duration_s)


def test_tokens_are_counted_from_chunks_without_usage_and_chat_reads_deltas():
    server = FakeServer(tokens=4, send_usage=False)
    run = run_benchmark(config(chat=True), transport=server.transport())
    assert all(r.output_tokens == 4 and r.tokens_source == "chunks" for r in run.requests)
    assert server.payloads[0]["messages"] == [{"role": "user", "content": config().prompt}]


@pytest.mark.parametrize("load", [{"concurrency": 2}, {"concurrency": None, "rate_rps": 200.0}])
def test_prompts_go_in_turn_warm_up_first(load):
    server = FakeServer(tokens=2)
    prompts = ("first", "second", "third")
    run_benchmark(config(num_requests=4, warmup_requests=1, prompts=prompts, **load), transport=server.transport())
    sent = [p["prompt"] for p in server.payloads]
    assert sent[0] == "first"  # the warm-up
    # the measured four in any order of arrival: the rest of two rounds of the three
    assert sorted(sent[1:]) == sorted(["second", "third", "first", "second"])


def test_a_finish_reason_ends_a_stream_that_sends_no_done():
    server = FakeServer(tokens=3, send_done=False, send_usage=False)
    run = run_benchmark(config(num_requests=2), transport=server.transport())
    assert all(r.is_ok and r.output_tokens == 3 for r in run.requests)


def test_payload_sends_ignore_eos_only_with_the_flag():
    server = FakeServer()
    run_benchmark(config(num_requests=1), transport=server.transport())
    run_benchmark(config(num_requests=1, ignore_eos=True, request_usage=False), transport=server.transport())
    plain, forced = server.payloads
    assert "ignore_eos" not in plain and plain["stream"] is True and plain["stream_options"] == {"include_usage": True}
    assert forced["ignore_eos"] is True and "stream_options" not in forced


def test_payload_asks_for_logprobs_in_each_endpoints_fields():
    server = FakeServer()
    run_benchmark(config(num_requests=1, logprobs=3), transport=server.transport())
    run_benchmark(config(num_requests=1, logprobs=0, chat=True), transport=server.transport())
    run_benchmark(config(num_requests=1), transport=server.transport())
    completion, chat, plain = server.payloads
    assert completion["logprobs"] == 3 and "top_logprobs" not in completion
    assert chat["logprobs"] is True and chat["top_logprobs"] == 0
    assert "logprobs" not in plain


def test_closed_loop_keeps_exactly_n_streams_in_flight():
    server = FakeServer(tokens=2, ttft_s=0.1, tpot_s=0.1)
    run = run_benchmark(config(concurrency=4, num_requests=8), transport=server.transport())
    assert len(run.requests) == 8 and server.max_in_flight == 4
    assert run.duration_s == pytest.approx(0.4, abs=0.15)  # two waves of 0.2 s


def test_duration_mode_stops_sending_after_the_duration():
    server = FakeServer(tokens=2, ttft_s=0.05, tpot_s=0.05)
    run = run_benchmark(config(num_requests=None, duration_s=0.5, concurrency=2), transport=server.transport())
    assert 6 <= len(run.requests) <= 12 and all(r.start_s < 0.5 for r in run.requests)


def test_errors_are_counted_and_the_run_goes_on():
    server = FakeServer(tokens=3, fail_every=3)
    summary = summarize(run_benchmark(config(num_requests=9), transport=server.transport()))
    assert (summary.completed, summary.failed) == (6, 3)
    assert summary.errors == (("HTTP 500: boom", 3),)


def test_a_stream_closed_midway_is_an_error():
    server = FakeServer(tokens=5, drop_after=2)
    summary = summarize(run_benchmark(config(num_requests=2), transport=server.transport()))
    assert summary.completed == 0 and summary.failed == 2
    assert summary.errors[0][0].startswith("server closed the stream early")


def test_a_failing_warmup_stops_the_run_with_the_servers_message():
    server = FakeServer(fail_every=1)
    with pytest.raises(UserError, match="warm-up request .* failed: HTTP 500: boom"):
        run_benchmark(config(warmup_requests=1), transport=server.transport())


def test_a_refused_connection_is_one_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="cannot connect .* is the server running"):
        run_benchmark(config(base_url=f"http://127.0.0.1:{port}/v1"))


def hexgen_status(server: FakeServer) -> dict:
    """/status of a hexgen server whose replica 0 steps 4 times per request (3 tokens each, 10 ms busy) and whose
    replica 1 (down) has not stepped since before the run."""
    n = len(server.payloads)
    engine0 = {"steps": 4 * n, "step_tokens": 12 * n, "sampled_tokens": 4 * n, "busy_s": 0.01 * n}
    engine1 = {"steps": 7, "step_tokens": 70, "sampled_tokens": 7, "busy_s": 1.0}
    return {"replicas": [{"index": 0, "status": "up", "running": 0, "waiting": 0, "engine": engine0},
                         {"index": 1, "status": "down", "running": 3, "waiting": 0, "engine": engine1}]}


def test_a_hexgen_server_reports_what_its_engines_did_during_the_run(tmp_path):
    server = FakeServer(tokens=2)
    server.status = lambda: hexgen_status(server)
    run = run_benchmark(config(num_requests=4, warmup_requests=1), transport=server.transport())
    engine = run.engine
    assert engine is not None
    # 4 measured requests (the warm-up's steps were counted before the run): replica 0 alone stepped
    assert (engine.replicas, engine.steps, engine.step_tokens, engine.sampled_tokens) == (1, 16, 48, 16)
    assert engine.busy_s == pytest.approx(0.04)
    assert engine.mean_step_ms == pytest.approx(2.5)
    assert (engine.tokens_per_step, engine.sampled_per_step) == (3.0, 1.0)
    assert engine.busy_fraction == pytest.approx(0.04 / run.duration_s)
    summary = summarize(run)
    assert summary.engine == engine
    console = Console(width=200, record=True)
    console.print(render_table(run.config, summary))
    text = console.export_text()
    assert "server: mean step (ms)" in text and "2.50" in text and "3.0 (1.0)" in text
    write_json(tmp_path / "run.json", run, summary)
    saved = json.loads((tmp_path / "run.json").read_text())["summary"]["engine"]
    assert saved["steps"] == 16 and saved["mean_step_ms"] == pytest.approx(2.5)


def test_other_servers_have_no_engine_figures():
    server = FakeServer(tokens=2)  # /status answers 404, as vLLM's does
    run = run_benchmark(config(num_requests=2), transport=server.transport())
    assert run.engine is None and summarize(run).engine is None
