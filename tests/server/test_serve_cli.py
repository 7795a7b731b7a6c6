"""`hexgen serve` options and plans: defaults, the default local plan's shape, user errors as one line."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import replace

import pytest
from serve_helpers import REPO_ROOT, write_plan

from hexgen.cli import build_parser
from hexgen.engine.checkpoint import resolve_model
from hexgen.models import load_model_spec
from hexgen.plan import LOCAL_MACHINE
from hexgen.server.launch import default_dispatch, default_local_plan


def test_defaults_listen_on_loopback_8000():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.dispatch, args.api_key, args.plan) == (
        "127.0.0.1", 8000, None, None, None
    )  # fmt: skip
    for policy in ("round-robin", "least-outstanding", "capacity-weighted"):
        assert build_parser().parse_args(["serve", "--dispatch", policy]).dispatch == policy
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dispatch", "random"])


def test_default_dispatch_follows_the_plan():
    spec = resolve_model("smollm2-135m", progress=False).spec
    unequal = default_local_plan(spec)  # a TP 3 | TP 1 replica beside a TP 1 one, no predictions
    assert default_dispatch(unequal) == "least-outstanding"  # ties to the fastest: speeds measured at start-up
    predicted = replace(unequal, replicas=tuple(replace(r, predicted={"throughput_rps": rps})
                                                for r, rps in zip(unequal.replicas, (2.5, 3.5), strict=True)))
    assert default_dispatch(predicted) == "capacity-weighted"
    same = replace(predicted, replicas=(predicted.replicas[-1], predicted.replicas[-1]))
    assert default_dispatch(same) == "least-outstanding"
    assert default_dispatch(replace(same, meta={"dispatch": "round-robin"})) == "round-robin"


@pytest.mark.parametrize("model", ["tiny", "smollm2-135m"])
def test_default_local_plan_has_two_replicas_one_asymmetric(model, chat_model_dir):
    spec = load_model_spec(str(chat_model_dir)) if model == "tiny" else resolve_model(model, progress=False).spec
    plan = default_local_plan(spec)
    assert len(plan.replicas) >= 2
    asymmetric = [r for r in plan.replicas if len(r.stages) >= 2 and len({s.tp for s in r.stages}) >= 2]
    assert asymmetric
    assert {s.machine for r in plan.replicas for s in r.stages} == {LOCAL_MACHINE}
    for replica in plan.replicas:  # each replica covers every layer once, in order
        assert [s.layers[0] for s in replica.stages][0] == 0 and replica.stages[-1].layers[1] == spec.num_layers
        assert all(a.layers[1] == b.layers[0] for a, b in zip(replica.stages, replica.stages[1:], strict=False))
    if model == "tiny":  # 4 heads / 2 KV heads: widest TP 2; a third of 4 layers rounds to 1
        assert [(s.tp, s.layers) for s in plan.replicas[0].stages] == [(2, (0, 3)), (1, (3, 4))]
    else:  # SmolLM2: 9 heads / 3 KV heads -> TP 3; 30 layers -> 20 + 10
        assert [(s.tp, s.layers) for s in plan.replicas[0].stages] == [(3, (0, 20)), (1, (20, 30))]


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "hexgen"), "serve", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip


def test_user_errors_are_one_line_without_processes(chat_model_dir, tmp_path):
    remote = write_plan(tmp_path / "remote.json", chat_model_dir, [[([0], (0, 4))]])
    remote.write_text(remote.read_text().replace('"localhost"', '"gpu-box-7"'))
    bad_layers = write_plan(tmp_path / "layers.json", chat_model_dir, [[([0], (0, 3))]])
    other_model = write_plan(tmp_path / "other.json", chat_model_dir, [[([0], (0, 4))]])
    other_model.write_text(other_model.read_text().replace(str(chat_model_dir), "llama-2-70b"))
    cases = [
        (["--plan", str(remote)], "gpu-box-7"),
        (["--plan", str(bad_layers)], "layers"),
        (["--plan", str(other_model)], "the plan is for model 'llama-2-70b' (80 layers, hidden size 8192)"),
        (["--plan", str(tmp_path / "missing.json")], "cannot read plan"),
        (["--port", "0"], "--port"),
        (["--max-queue", "0"], "--max-queue"),
        (["--max-context", "1"], "--max-context must be >= 2, got 1"),
        (["--shutdown-grace-s", "-1"], "--shutdown-grace-s must be in 0..3600, got -1"),
        (["--api-key", " "], "--api-key must not be empty"),
        (["--served-model-name", ""], "--served-model-name must not be empty"),
        (["--ray", "127.0.0.1:6379"], "--ray needs --plan"),
        (["--replan"], "--replan needs --ray and --cluster"),
        (["--ray", "127.0.0.1:1", "--plan", str(remote)], "cannot reach the Ray cluster at 127.0.0.1:1"),
        (["--block-size", "24"], "--block-size must be a power of two in 1..256, got 24"),
        (["--speculative-tokens", "-1"], "--speculative-tokens must be in 0..16 (0 = off), got -1"),
        (["--memory-gb", "1e-6"], "cannot hold a rank's weights plus one KV block for each of --max-batch 64"),
        (["--device", "cuda"], "--device cuda: the plan uses GPU indices up to"),
    ]
    for args, words in cases:
        result = _serve("--model", str(chat_model_dir), *args)
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.startswith("hexgen serve: error:")


def test_a_taken_port_fails_before_any_replica_loads(chat_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = _serve("--model", str(chat_model_dir), "--port", str(port))
        elapsed_s = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"hexgen serve: error: cannot listen on 127.0.0.1:{port}")
    assert "ready on" not in result.stderr and "loading" not in result.stderr
    assert elapsed_s < 15, f"took {elapsed_s:.1f} s: the port must be checked before loading"


def test_ray_address_of_something_else_fails_within_10_s(chat_model_dir, tmp_path):
    remote = write_plan(tmp_path / "remote.json", chat_model_dir, [[([0], (0, 4))]])
    with socket.socket() as other:  # listens, accepts, never speaks gRPC
        other.bind(("127.0.0.1", 0))
        other.listen(4)
        started = time.monotonic()
        result = _serve("--model", str(chat_model_dir), "--plan", str(remote), "--ray",
                        f"127.0.0.1:{other.getsockname()[1]}")
        elapsed_s = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("hexgen serve: error:") and "Ray" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert elapsed_s < 10
