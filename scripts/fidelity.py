"""How well does the simulator predict the real server? Serve the default local plan, measure it with the
serving benchmark at several loads, simulate the same plan and workload, and write docs/fidelity.md.

    .venv/bin/python scripts/fidelity.py [--cluster examples/clusters/local-cpu.yaml] [--requests 24]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hexgen.benchserve.config import BenchConfig
from hexgen.benchserve.loadgen import run_benchmark
from hexgen.benchserve.metrics import summarize
from hexgen.cluster import load_cluster
from hexgen.launch.lifetime import free_port
from hexgen.machine import cpu_description
from hexgen.models import load_model_spec
from hexgen.plan import plan_from_dict
from hexgen.sim.run import simulate_plan
from hexgen.sim.workload import TokenLengths, WorkloadSpec
from hexgen.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who told stories."


def start_server(port: int, max_batch: int) -> subprocess.Popen:
    cmd = [str(ROOT / ".venv/bin/hexgen"), "serve", "--model", MODEL, "--port", str(port), "--max-batch",
           str(max_batch), "--dispatch", "least-outstanding"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"hexgen serve exited with code {proc.returncode}")
        time.sleep(1)
    stop_server(proc)
    sys.exit("hexgen serve did not become ready in 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def measure(port: int, load: dict, max_tokens: int, requests: int):
    config = BenchConfig(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, prompt=PROMPT, max_tokens=max_tokens,
                         concurrency=load.get("concurrency"), rate_rps=load.get("rate"), num_requests=requests,
                         ignore_eos=True, seed=0)
    return summarize(run_benchmark(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cluster", default=str(ROOT / "examples/clusters/local-cpu.yaml"))
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "docs/fidelity.md"))
    args = parser.parse_args()
    loads = [{"concurrency": 1}, {"rate": 0.25}, {"rate": 0.5}, {"rate": 1.0}, {"rate": 2.0}]
    port = free_port()
    started = time.monotonic()
    proc = start_server(port, args.max_batch)
    try:
        status = httpx.get(f"http://127.0.0.1:{port}/status", timeout=10).json()
        measured = [measure(port, load, args.max_tokens, args.requests) for load in loads]
    finally:
        stop_server(proc)
    plan = plan_from_dict(status["plan"], "served plan")
    from hexgen.engine.checkpoint import resolve_model

    source = resolve_model(MODEL)
    prompt_tokens = len(Tokenizer(source.directory).encode(PROMPT))
    cluster, spec = load_cluster(args.cluster), load_model_spec(MODEL)
    rows = []
    for load, real in zip(loads, measured, strict=True):
        rate = load.get("rate", 0.01)  # closed loop at concurrency 1 = requests alone = a very light open loop
        workload = WorkloadSpec(rate, 200, TokenLengths.fixed(prompt_tokens), TokenLengths.fixed(args.max_tokens))
        sim = simulate_plan(plan, cluster, spec, workload, slo_s=1e9, dispatch="least-outstanding",
                            max_batch=args.max_batch)
        rows.append((load, real, sim))
    write_report(Path(args.out), rows, prompt_tokens, args, plan.to_dict(), time.monotonic() - started)


def _err(predicted: float, measured: float) -> str:
    return f"{(predicted - measured) / measured * 100:+.0f}%"


def write_report(path: Path, rows, prompt_tokens: int, args, plan: dict, elapsed_s: float) -> None:
    lines = [
        "# Simulator fidelity: predicted against measured on this machine",
        "",
        "    .venv/bin/python scripts/fidelity.py",
        "",
        f"Machine: {cpu_description()}; {datetime.date.today()}; took {elapsed_s:.0f} s. Served plan: `hexgen serve`'s "
        "default local plan (replica 0: TP 3 x 20 layers -> TP 1 x 10 layers; replica 1: TP 1 x 30 layers), "
        f"SmolLM2-135M fp32, continuous batching up to {args.max_batch} sequences, least-outstanding dispatch. "
        f"Every request: {prompt_tokens}-token prompt, {args.max_tokens} output tokens (ignore_eos). Prediction: "
        f"`hexgen.sim` on `{Path(args.cluster).relative_to(ROOT)}` with the same plan, dispatch, batch limit and "
        "workload (200 simulated requests per load).",
        "",
        "| load | measured e2e mean (s) | predicted (s) | error | measured e2e p90 (s) | predicted (s) | error |"
        " measured output tok/s | predicted | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load, real, sim in rows:
        name = f"concurrency {load['concurrency']}" if "concurrency" in load else f"Poisson {load['rate']} req/s"
        tps_sim = sim.output_tokens_per_s if "rate" in load else args.max_tokens / sim.latency_mean_s
        lines.append(
            f"| {name} | {real.e2e_s.mean:.2f} | {sim.latency_mean_s:.2f} | {_err(sim.latency_mean_s, real.e2e_s.mean)}"
            f" | {real.e2e_s.p90:.2f} | {sim.latency_p90_s:.2f} | {_err(sim.latency_p90_s, real.e2e_s.p90)}"
            f" | {real.output_throughput_tps:.1f} | {tps_sim:.1f} | {_err(tps_sim, real.output_throughput_tps)} |"
        )
    lines += ["", "Plan as served:", "", "```json", json.dumps(plan, indent=1), "```", ""]
    path.write_text("\n".join(lines))
    print("\n".join(lines[:14 + len(rows)]))


if __name__ == "__main__":
    main()
