"""How well does the simulator predict the real server? Serve the default local plan, measure it with the
serving benchmark at several loads, simulate the same plan and workload, and write docs/fidelity.md.
Measurements are kept in docs/fidelity.json; --predict-only re-simulates them (e.g. after recalibrating the cluster).

    .venv/bin/python scripts/fidelity.py [--cluster examples/clusters/local-cpu.yaml] [--requests 24] [--predict-only]
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
from hexgen.costmodel import CostConfig
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


def measure(port: int, load: dict, max_tokens: int, requests: int) -> dict:
    config = BenchConfig(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, prompt=PROMPT, max_tokens=max_tokens,
                         concurrency=load.get("concurrency"), rate_rps=load.get("rate"), num_requests=requests,
                         ignore_eos=True, seed=0)
    summary = summarize(run_benchmark(config))
    return {"load": load, "e2e_mean_s": summary.e2e_s.mean, "e2e_p90_s": summary.e2e_s.p90,
            "output_tps": summary.output_throughput_tps, "ttft_p50_s": summary.ttft_s.p50,
            "tpot_p50_s": summary.tpot_s.p50}


def measure_all(args) -> dict:
    loads = [{"concurrency": 1}, {"rate": 0.25}, {"rate": 0.5}, {"rate": 1.0}, {"rate": 2.0}]
    port = free_port()
    started = time.monotonic()
    proc = start_server(port, args.max_batch)
    try:
        plan = httpx.get(f"http://127.0.0.1:{port}/status", timeout=10).json()["plan"]
        rows = [measure(port, load, args.max_tokens, args.requests) for load in loads]
    finally:
        stop_server(proc)
    return {"plan": plan, "rows": rows, "cpu": cpu_description(), "date": str(datetime.date.today()),
            "seconds": round(time.monotonic() - started), "max_tokens": args.max_tokens, "max_batch": args.max_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cluster", default=str(ROOT / "examples/clusters/local-cpu.yaml"))
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--predict-only", action="store_true", help="reuse docs/fidelity.json's measurements")
    parser.add_argument("--out", default=str(ROOT / "docs/fidelity.md"))
    args = parser.parse_args()
    store = Path(args.out).with_suffix(".json")
    measured = json.loads(store.read_text()) if args.predict_only else measure_all(args)
    store.write_text(json.dumps(measured, indent=1) + "\n")
    plan = plan_from_dict(measured["plan"], "served plan")
    from hexgen.engine.checkpoint import resolve_model

    prompt_tokens = len(Tokenizer(resolve_model(MODEL).directory).encode(PROMPT))
    cluster, spec = load_cluster(args.cluster), load_model_spec(MODEL)
    cfg = CostConfig(dtype_bytes=4)  # the server runs fp32
    predicted = []
    for row in measured["rows"]:
        rate = row["load"].get("rate", 0.01)  # concurrency 1 = requests alone = a very light open loop
        lengths = TokenLengths.fixed(prompt_tokens), TokenLengths.fixed(measured["max_tokens"])
        workload = WorkloadSpec(rate, 200, *lengths)
        predicted.append(simulate_plan(plan, cluster, spec, workload, slo_s=1e9, dispatch="least-outstanding",
                                       max_batch=measured["max_batch"], cfg=cfg))
    write_report(Path(args.out), measured, predicted, prompt_tokens, Path(args.cluster))


def _err(predicted: float, measured: float) -> str:
    return f"{(predicted - measured) / measured * 100:+.0f}%"


def write_report(path: Path, measured: dict, predicted: list, prompt_tokens: int, cluster_path: Path) -> None:
    max_tokens = measured["max_tokens"]
    lines = [
        "# Simulator fidelity: predicted against measured on this machine",
        "",
        "    .venv/bin/python scripts/fidelity.py          # measure and predict (about 7 minutes)",
        "    .venv/bin/python scripts/fidelity.py --predict-only   # re-predict the stored measurements",
        "",
        f"Machine: {measured['cpu']}; {measured['date']}; measuring took {measured['seconds']} s. Served plan: "
        "`hexgen serve`'s default local plan (replica 0: TP 3 x 20 layers -> TP 1 x 10 layers; replica 1: TP 1 x 30 "
        f"layers; 5 processes on 2 cores), SmolLM2-135M fp32, continuous batching up to {measured['max_batch']} "
        f"sequences, least-outstanding dispatch. Every request: {prompt_tokens}-token prompt, {max_tokens} output "
        "tokens (ignore_eos), measured with `hexgen bench serve`. Prediction: `hexgen.sim` on "
        f"`{cluster_path.relative_to(ROOT)}` with the same plan, dispatch policy code, batch limit and workload "
        "(200 simulated requests per load, fp32 weights).",
        "",
        "| load | measured e2e mean (s) | predicted | error | measured e2e p90 (s) | predicted | error |"
        " measured output tok/s | predicted | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, sim in zip(measured["rows"], predicted, strict=True):
        load = row["load"]
        name = f"concurrency {load['concurrency']}" if "concurrency" in load else f"Poisson {load['rate']} req/s"
        tps_sim = sim.output_tokens_per_s if "rate" in load else max_tokens / sim.latency_mean_s
        lines.append(
            f"| {name} | {row['e2e_mean_s']:.2f} | {sim.latency_mean_s:.2f}"
            f" | {_err(sim.latency_mean_s, row['e2e_mean_s'])}"
            f" | {row['e2e_p90_s']:.2f} | {sim.latency_p90_s:.2f} | {_err(sim.latency_p90_s, row['e2e_p90_s'])}"
            f" | {row['output_tps']:.1f} | {tps_sim:.1f} | {_err(tps_sim, row['output_tps'])} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
