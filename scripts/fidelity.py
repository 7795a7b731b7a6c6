"""How well does the simulator predict the real server? Serve three local plans (one process; the two-stage
TP 1 | TP 1 pipeline; `hexgen serve`'s default plan), measure each with `hexgen bench serve` at 1 and 16 streams,
simulate the same plans and closed-loop load on this machine's measured CPU profile, and write docs/fidelity.md.
Measurements are kept in docs/fidelity.json; --predict-only re-simulates them (e.g. after re-profiling).

    .venv/bin/python scripts/fidelity.py [--requests-per-stream 3] [--predict-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np

from hexgen.benchserve.config import BenchConfig
from hexgen.benchserve.loadgen import run_benchmark
from hexgen.benchserve.metrics import summarize
from hexgen.cluster import Cluster, load_cluster
from hexgen.costmodel import CostConfig, Workload
from hexgen.dispatch import make_policy
from hexgen.launch.lifetime import free_port
from hexgen.launch.spec import cpu_threads_per_rank
from hexgen.machine import cpu_description
from hexgen.models import load_model_spec
from hexgen.plan import DeploymentPlan, plan_from_dict, single_replica_plan
from hexgen.planner.evaluate import with_predictions
from hexgen.profile import DeviceProfile, apply_profiles, load_profile
from hexgen.server.launch import capacity_weight, default_local_plan
from hexgen.sim.run import replica_models, shared_hosts
from hexgen.sim.simulator import simulate_streams
from hexgen.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who told stories."
PLANS = {"one process": [1], "two stages, TP 1 -> TP 1": [1, 1], "default plan": None}
STREAMS = (1, 16)
CALIBRATION_STREAMS = 4  # the load of the run that measures the CPU time beside the ranks (not a measured row)
CLUSTER = ROOT / "examples/clusters/local-cpu.yaml"
# A CPU rank's torch threads follow launch/spec.py:cpu_threads_per_rank: one profile per thread count.
PROFILES = {2: ROOT / "examples/profiles/cpu-epyc-2core.yaml",
            1: ROOT / "examples/profiles/cpu-epyc-2core-1thread.yaml"}


def start_server(port: int, plan_path: str | None, max_batch: int) -> subprocess.Popen:
    # Every request sends the same prompt; the simulator computes every prompt in full, so the server must too.
    cmd = [str(ROOT / ".venv/bin/hexgen"), "serve", "--model", MODEL, "--port", str(port), "--max-batch",
           str(max_batch), "--dispatch", "capacity-weighted", "--no-prefix-caching",
           "--dtype", "float32"]  # as the CPU profiles were measured
    cmd += ["--plan", plan_path] if plan_path else []
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


def local_profile(plan: DeploymentPlan, cores: int) -> DeviceProfile:
    """This machine's CPU profile measured at the thread count `hexgen serve` gives the plan's ranks."""
    return load_profile(PROFILES[min(cpu_threads_per_rank(list(plan.replicas), cores), max(PROFILES))])


def local_cluster(plan: DeploymentPlan, cores: int) -> Cluster:
    """This machine: its worker slots share `cores` CPU cores, with the profile of the ranks' thread count."""
    cluster = apply_profiles(load_cluster(CLUSTER), [local_profile(plan, cores)])
    return Cluster(tuple(replace(m, cpu_cores=cores) for m in cluster.machines), cluster.network)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def beside_ranks_cpu_s_per_token(prompt_tokens: int, args) -> float:
    """CPU seconds per streamed output token of the processes that share the cores with the ranks while measuring:
    the HTTP coordinator (`hexgen serve`'s main process) and the load generator (this process). Measured on a run
    of its own, not one of the rows: the one-process plan at CALIBRATION_STREAMS streams."""
    with serving([1], prompt_tokens, args) as (port, proc):
        config = bench_config(port, CALIBRATION_STREAMS, 2 * CALIBRATION_STREAMS, args, seed=1)
        coordinator_before, client_before = _cpu_s(proc.pid), time.process_time()
        run_benchmark(config)
        spent = _cpu_s(proc.pid) - coordinator_before + time.process_time() - client_before
    return spent / (config.num_requests * args.max_tokens)


@contextmanager
def serving(tp_degrees: list[int] | None, prompt_tokens: int, args) -> Iterator[tuple[int, subprocess.Popen]]:
    """`hexgen serve` on the plan (see served_plan) for the duration of the block: (its port, its process)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = str(Path(tmp) / "plan.json")
        served_plan(tp_degrees, prompt_tokens, args).save(plan_path)
        proc = start_server(port, plan_path, args.max_batch)
        try:
            yield port, proc
        finally:
            stop_server(proc)


def bench_config(port: int, streams: int, num_requests: int, args, seed: int) -> BenchConfig:
    return BenchConfig(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, prompt=PROMPT, max_tokens=args.max_tokens,
                       concurrency=streams, num_requests=num_requests, ignore_eos=True, seed=seed)


def served_plan(tp_degrees: list[int] | None, prompt_tokens: int, args) -> DeploymentPlan:
    """The plan with the planner's predictions, so the server's capacity-weighted dispatch gets the same replica
    weights as the simulator's; None = `hexgen serve`'s default local plan."""
    spec = load_model_spec(MODEL)
    plan = default_local_plan(spec) if tp_degrees is None else single_replica_plan(spec, tp_degrees, None)
    sizing = Workload(prompt_tokens, args.max_tokens, args.max_batch)
    return with_predictions(plan, local_cluster(plan, os.cpu_count() or 1), spec, sizing, CostConfig(dtype_bytes=4))


def measure_plan(name: str, tp_degrees: list[int] | None, prompt_tokens: int, args) -> dict:
    """Serve one plan and measure it at every stream count; returns the plan as served and the rows."""
    with serving(tp_degrees, prompt_tokens, args) as (port, _):
        served = httpx.get(f"http://127.0.0.1:{port}/status", timeout=10).json()["plan"]
        rows = [measure(port, streams, args) for streams in STREAMS]
    return {"name": name, "plan": served, "rows": rows}


def _load() -> float:
    """The machine's 1-minute load average: other work on the cores slows every rank of the server."""
    return round(os.getloadavg()[0], 2)


def measure(port: int, streams: int, args) -> dict:
    config = bench_config(port, streams, streams * args.requests_per_stream, args, seed=0)
    load_before = _load()
    result = run_benchmark(config)
    summary = summarize(result)
    return {"streams": streams, "requests": config.num_requests, "e2e_mean_s": summary.e2e_s.mean,
            "e2e_p90_s": summary.e2e_s.p90, "output_tps": summary.output_throughput_tps,
            "load_average_1m": [load_before, _load()], "e2e_s": sorted(round(r.e2e_s, 3) for r in result.requests)}


def measured_cores(measured: dict) -> int:
    """Cores of the machine that measured (recorded since CPU sharing is modelled; before, this same machine)."""
    return measured.get("cores") or os.cpu_count() or 1


def predict(entry: dict, row: dict, measured: dict, prompt_tokens: int, coordinator_s: float) -> dict:
    """The simulator on the same plan and closed-loop load, with the CPU profile of the ranks' thread count, every
    rank and the processes beside them (`coordinator_s` CPU seconds per token) sharing this machine's cores."""
    plan = plan_from_dict(entry["plan"], entry["name"])
    cluster = local_cluster(plan, measured_cores(measured))
    spec, cfg = load_model_spec(MODEL), CostConfig(dtype_bytes=4)  # the server runs fp32
    sizing = Workload(prompt_tokens, measured["max_tokens"], measured["max_batch"])
    models = replica_models(plan, cluster, spec, cfg, measured["max_batch"], sizing)
    hosts = shared_hosts(plan, cluster, coordinator_s)
    weights = [capacity_weight(r) for r in plan.replicas]  # what the server dispatched by: the served plan's
    done = simulate_streams(models, row["streams"], row["requests"], prompt_tokens, measured["max_tokens"],
                            make_policy("capacity-weighted"), hosts, weights)
    latency = np.array([c.latency_s for c in done])
    span = max(c.finish_s for c in done)
    by_replica = [[c.latency_s for c in done if c.replica == r] for r in range(len(models))]
    return {"e2e_mean_s": float(latency.mean()), "e2e_p90_s": float(np.percentile(latency, 90)),
            "output_tps": row["requests"] * measured["max_tokens"] / span,
            "replica_e2e_s": [(len(x), float(np.mean(x)) if x else 0.0) for x in by_replica]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-stream", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--predict-only", action="store_true", help="reuse docs/fidelity.json's measurements")
    parser.add_argument("--out", default=str(ROOT / "docs/fidelity.md"))
    args = parser.parse_args()
    store = Path(args.out).with_suffix(".json")
    from hexgen.engine.checkpoint import resolve_model

    tokenizer = Tokenizer(resolve_model(MODEL).directory)
    prompt_tokens = len(tokenizer.encode(PROMPT))
    if args.predict_only:
        measured = json.loads(store.read_text())
    else:
        started = time.monotonic()
        beside_s = beside_ranks_cpu_s_per_token(prompt_tokens, args)
        plans = [measure_plan(name, tp, prompt_tokens, args) for name, tp in PLANS.items()]
        measured = {"plans": plans, "beside_ranks_cpu_s_per_token": beside_s,
                    "cpu": cpu_description(), "date": str(datetime.date.today()),
                    "seconds": round(time.monotonic() - started), "max_tokens": args.max_tokens,
                    "max_batch": args.max_batch, "cores": os.cpu_count()}
        store.write_text(json.dumps(measured, indent=1) + "\n")
    if "beside_ranks_cpu_s_per_token" not in measured:
        sys.exit(f"{store} predates the measured CPU time beside the ranks: run without --predict-only")
    coordinator_s = measured["beside_ranks_cpu_s_per_token"]
    predicted = [[predict(entry, row, measured, prompt_tokens, coordinator_s) for row in entry["rows"]]
                 for entry in measured["plans"]]
    write_report(Path(args.out), measured, predicted, prompt_tokens, coordinator_s)


def _err(predicted: float, measured: float) -> str:
    return f"{(predicted - measured) / measured * 100:+.0f}%"


def _shape(plan: dict) -> str:
    return "; ".join(" -> ".join(f"TP {s['tp']} x {s['layers'][1] - s['layers'][0]}" for s in r["stages"])
                     for r in plan["replicas"])


def write_report(path: Path, measured: dict, predicted: list, prompt_tokens: int, coordinator_s: float) -> None:
    lines = [
        "# Simulator fidelity: predicted against measured on this machine",
        "",
        "    .venv/bin/python scripts/fidelity.py                  # measure and predict",
        "    .venv/bin/python scripts/fidelity.py --predict-only   # re-predict the stored measurements",
        "",
        f"Machine: {measured['cpu']}; {measured['date']}; measuring took {measured['seconds']} s. SmolLM2-135M fp32, "
        f"`hexgen serve --max-batch {measured['max_batch']} --dispatch capacity-weighted`, every request a "
        f"{prompt_tokens}-token prompt and {measured['max_tokens']} output tokens (ignore_eos), closed-loop load from "
        "`hexgen bench serve --concurrency N`. Prediction: `hexgen.sim` (the engine's scheduler, micro-batches in "
        "flight, the same dispatch code and closed loop) on `examples/clusters/local-cpu.yaml` with this machine's "
        "measured CPU profile (`examples/profiles/`, one thread per rank for multi-rank replicas, two for one rank), "
        "every rank and the coordinator sharing the machine's cores. "
        "Targets: mean latency and throughput within 10%, p90 within 20%.",
        "",
        "| plan | streams | load avg | measured e2e mean (s) | predicted | error | measured p90 (s) | predicted |"
        " error | measured output tok/s | predicted | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry, sims in zip(measured["plans"], predicted, strict=True):
        for row, sim in zip(entry["rows"], sims, strict=True):
            load = "–".join(f"{x:.1f}" for x in row.get("load_average_1m", [])) or "not recorded"
            lines.append(
                f"| {entry['name']} ({_shape(entry['plan'])}) | {row['streams']} | {load} | {row['e2e_mean_s']:.2f} | "
                f"{sim['e2e_mean_s']:.2f} | {_err(sim['e2e_mean_s'], row['e2e_mean_s'])} | {row['e2e_p90_s']:.2f} | "
                f"{sim['e2e_p90_s']:.2f} | {_err(sim['e2e_p90_s'], row['e2e_p90_s'])} | {row['output_tps']:.1f} | "
                f"{sim['output_tps']:.1f} | {_err(sim['output_tps'], row['output_tps'])} |"
            )
    lines += reading(measured, predicted, coordinator_s * 1e6) + [f"- {note}" for note in measured.get("notes", [])]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _replica_split(rows: list) -> str:
    """The most loaded multi-replica row's requests by replica: the simulator's count and mean per replica beside
    the measured requests split the same way by latency (the slowest N measured for the replica sent N)."""
    for entry, row, sim in sorted(rows, key=lambda x: -x[1]["streams"]):
        split = sim.get("replica_e2e_s", [])
        if len(split) < 2 or "e2e_s" not in row:
            continue
        measured, parts = sorted(row["e2e_s"]), []
        for count, mean_s in sorted(split, key=lambda x: -x[1]):
            taken, measured = measured[len(measured) - count:], measured[:len(measured) - count]
            parts.append(f"{count} requests: {mean_s:.2f} s predicted, {np.mean(taken):.2f} s measured")
        return f"({entry['name']} at {row['streams']} streams, slower replica first): {'; '.join(parts)}"
    return ""


def reading(measured: dict, predicted: list, coordinator_us: float) -> list[str]:
    """What the table says, in the last measurement's figures."""
    rows = [(e, r, p) for e, sims in zip(measured["plans"], predicted, strict=True)
            for r, p in zip(e["rows"], sims, strict=True)]
    def hits(r: dict, p: dict) -> bool:
        return (abs(p["e2e_mean_s"] / r["e2e_mean_s"] - 1) <= 0.1 and abs(p["output_tps"] / r["output_tps"] - 1) <= 0.1
                and abs(p["e2e_p90_s"] / r["e2e_p90_s"] - 1) <= 0.2)

    within = [f"{e['name']} at {r['streams']} stream(s)" for e, r, p in rows if hits(r, p)]
    outside = [f"{e['name']} at {r['streams']} stream(s) (mean {p['e2e_mean_s'] / r['e2e_mean_s'] - 1:+.0%}, p90 "
               f"{p['e2e_p90_s'] / r['e2e_p90_s'] - 1:+.0%}, output tok/s {p['output_tps'] / r['output_tps'] - 1:+.0%})"
               for e, r, p in rows if not hits(r, p)]
    loads = [x for _, r, _ in rows for x in r.get("load_average_1m", [])] or measured.get("load_average_1m_observed")
    tokens = measured["max_tokens"]
    per_token = [(r["e2e_mean_s"] / tokens * 1e3, p["e2e_mean_s"] / tokens * 1e3) for _, r, p in rows]
    ratios = [m / p for m, p in per_token]
    bandwidth = {threads: load_profile(path).memory_bandwidth_gbs for threads, path in PROFILES.items()}
    one_thread = load_profile(PROFILES[1])
    handoff = {threads: f"{p.colocated_handoff_ms:.2f} ms + {p.colocated_handoff_seq_ms:.3f} ms per sequence"
               for threads, p in ((t, load_profile(path)) for t, path in PROFILES.items())}
    by_ranks = "; ".join(f"TP {t}: {ms:.2f} ms with one thread per rank" for t, ms in one_thread.allreduce_ms_by_ranks)
    slow_fast = _replica_split(rows)
    return [
        "",
        "## Reading the errors",
        "",
        f"- **Within the targets:** {', '.join(within) if within else 'none of the six rows'}. Per output token the "
        f"server took {min(ratios):.2f}-{max(ratios):.2f}x the predicted time"
        + ("; every prediction is on the fast side." if min(ratios) > 1 else "."),
        *([f"- **Outside the targets:** {', '.join(outside)}: what the simulator leaves out of replicas that run at "
           "once on shared cores (below) shows there."] if outside else []),
        f"- **Two cores, shared.** Load average {min(loads):.1f}-{max(loads):.1f} while measuring. Besides the ranks, "
        "the HTTP coordinator and the benchmark client run on the same 2 cores, and other sessions' work comes and "
        "goes; the profile reports what the cores do when they are free (the fastest of repeated timings), and the "
        "cost model has no term for cores taken by other processes." if loads else "- Load: not recorded.",
        "- **Co-located ranks share the cores.** The simulator runs every rank and the coordinator on this machine's "
        f"{measured_cores(measured)} cores (`hexgen/sim/host.py`): threads get at most the cores left "
        "free by the steps already running (k threads on L free cores take k / L times as long), and a TP group, whose "
        "ranks meet at a barrier every few hundred microseconds, runs in ceil(k / cores) waves and waits for the last "
        "(the default plan's TP-3 group of one-thread ranks takes twice its alone time on 2 cores). The coordinator's "
        f"per-token work and the load generator's, which share the cores while measuring ({coordinator_us:.0f} µs of "
        f"CPU per output token, measured on a run at {CALIBRATION_STREAMS} streams that is not one of the rows), are "
        "one more busy thread. As the engine runs them, a replica's stages "
        "on this machine take turns (one micro-batch in flight), each rank with the cores over the replicas' largest "
        "TP groups as threads, and each handoff between them costs what `hexgen profile --model` measured by serving "
        f"the model as TP 1 | TP 1 beside one process ({handoff[2]}; with 1 thread {handoff[1]}). "
        "Steps already committed keep their cores "
        "(first come, first served, where the kernel shares fairly): throughput is right, single steps' times are "
        "spread differently. Not modelled: memory bandwidth, which one thread nearly saturates here (profiles: "
        f"{bandwidth[1]:.1f} GB/s with 1 thread, {bandwidth[2]:.1f} with 2), so two busy one-thread stages each "
        "scan weights at about half speed; "
        "the scheduler's wake-up delays inside a TP group's all-reduces; and an unequal share between a TP group "
        "and independent ranks (ranks that never wait at barriers take more than their share). GPU machines (a "
        "device per rank) are unaffected.",
        "- **TP groups on more ranks than cores** (the default plan's TP-3 group of one-thread ranks on 2 cores). "
        "Its all-reduces go through shared memory (`engine/shm_allreduce.py`), and the cost model prices them at each "
        "degree the profile served: `hexgen profile --model` serves the model as one TP-t stage for every valid t up "
        f"to 4 and fits the fixed time of an all-reduce at that degree to the step ({by_ranks}), in place of the ring "
        "formula from the two-rank gloo link (2(t - 1) x "
        f"{one_thread.allreduce.latency_s * 1e3:.2f} ms). By replica, the busiest multi-replica row {slow_fast}. "
        "Under load the two replicas share the cores; the simulator gives a step that started first its cores "
        "(first come, first served), where the kernel shares them among runnable threads. With gloo's all-reduce "
        "(about 1.2 ms here, before shared memory) this row's p90 came out 21% under the measurement: the kernel gave "
        "the TP-3 group, whose ranks then slept at every all-reduce, less than its share (8.6 s measured against "
        "7.2 s predicted for its requests).",
        "- The profiles' per-layer and per-sequence overheads are fitted to SmolLM2's own decode steps on one rank "
        "(`hexgen profile --model smollm2-135m`); with a tiny model's overheads only, every prediction was 1.4-5.8x "
        "too fast (first measurement, kept in git history).",
        "- To re-measure: `hexgen profile --model smollm2-135m -o examples/profiles/cpu-epyc-2core.yaml`, the same "
        "with `--threads 1 -o examples/profiles/cpu-epyc-2core-1thread.yaml`, then this script (about 3 minutes).",
    ]

if __name__ == "__main__":
    main()
