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
from hexgen.server.launch import default_cuda_plan, default_dispatch, default_local_plan


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


GIB = 1 << 30


@pytest.mark.parametrize(("model", "gpus_gib", "layout", "idle"), [
    # bf16 weights by hand: SmolLM2 0.25 GiB; Llama-3-8B 15.0 GiB (7.5 a TP-2 shard); Llama-2-70B 128.5 GiB (32.1 a
    # TP-4 shard, 64.2 TP 2); Llama-2-13B 24.2 GiB (12.1 a TP-2 shard; 8.3 for 14 layers). A rank may take 75%.
    ("smollm2-135m", [24, 24], [[((0,), (0, 30))], [((1,), (0, 30))]], ""),  # one replica per GPU
    ("llama-2-70b", [80] * 8, [[((0, 1, 2, 3), (0, 80))], [((4, 5, 6, 7), (0, 80))]], ""),  # TP 2: 80% a GPU
    ("llama-2-70b", [80] * 6, [[((0, 1, 2, 3), (0, 80))]], "[4, 5]"),
    ("llama-3-8b", [16, 16, 16], [[((0, 1), (0, 32))]], "[2]"),  # TP 3 does not divide 32 heads / 8 KV heads
    ("llama-2-13b", [16, 16, 16], [[((0,), (0, 13)), ((1,), (13, 27)), ((2,), (27, 40))]], ""),  # 12.1 > 12
    ("llama-2-13b", [16, 40, 16], [[((0,), (0, 13)), ((1,), (13, 27)), ((2,), (27, 40))]], ""),  # smallest GPU
])
def test_default_cuda_plan_fills_the_gpus_with_the_fewest_per_replica(model, gpus_gib, layout, idle):
    plan = default_cuda_plan(load_model_spec(model), [g * GIB for g in gpus_gib], 2)
    assert [[(s.gpus, s.layers) for s in r.stages] for r in plan.replicas] == layout
    assert all(s.tp == len(s.gpus) and s.machine == LOCAL_MACHINE for r in plan.replicas for s in r.stages)
    assert plan.meta["layout"].endswith(f", GPU(s) {idle} left idle" if idle else "")
    assert ("left idle" in plan.meta["layout"]) == bool(idle)


def test_default_cuda_plan_says_when_the_gpus_cannot_hold_the_model():
    from hexgen.errors import PlanError

    with pytest.raises(PlanError, match=r"llama-2-70b's weights \(128.5 GiB\) do not fit on this machine's 4 GPU"):
        default_cuda_plan(load_model_spec("llama-2-70b"), [24 * GIB] * 4, 2)


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
    on_gpu_2 = write_plan(tmp_path / "gpu2.json", chat_model_dir, [[([2], (0, 4))]])
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
        (["--allowed-origins", "http://localhost:3000,,*"], "--allowed-origins takes comma-separated origins"),
        (["--served-model-name", ""], "--served-model-name must not be empty"),
        (["--ray", "127.0.0.1:6379"], "--ray needs --plan"),
        (["--replan"], "--replan needs --ray and --cluster"),
        (["--ray", "127.0.0.1:1", "--plan", str(remote)], "cannot reach the Ray cluster at 127.0.0.1:1"),
        (["--block-size", "24"], "--block-size must be a power of two in 1..256, got 24"),
        (["--speculative-tokens", "-1"], "--speculative-tokens must be in 0..16 (0 = off), got -1"),
        (["--memory-gb", "1e-6"], "cannot hold a rank's weights plus one KV block for each of --max-batch 64"),
        (["--device", "cuda"], "--device cuda: no CUDA device is visible"),
        (["--device", "cuda", "--plan", str(on_gpu_2)], "--device cuda: the plan uses GPU indices up to 2 but 0"),
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
