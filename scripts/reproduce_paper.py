"""Reproduce the HexGen paper's comparisons in simulation, twice: in the paper's setting (one request at a time per
replica, round-robin) and with the engine we run (continuous batching over a paged KV cache, micro-batches in
flight across pipeline stages, capacity-weighted dispatch). Writes docs/results.md, docs/results.json and
docs/figures/*.png.

    .venv/bin/python scripts/reproduce_paper.py                      # both settings, several minutes on 2 cores
    .venv/bin/python scripts/reproduce_paper.py --only batching      # one setting; the other from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from reproduce_report import write_report
from rich.console import Console
from rich.progress import Progress

from hexgen.cluster import Cluster, builtin_gpu_types, load_cluster
from hexgen.costmodel import CostConfig, StagePlacement, Workload, allreduce_s, replica_stage_costs
from hexgen.costmodel.stage import layer_cost
from hexgen.dispatch import make_policy
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.machine import cpu_description
from hexgen.models import ModelSpec, load_model_spec
from hexgen.plan import DeploymentPlan
from hexgen.planner.baselines import FixedStage, fixed_layout_latency_s, reference_latency_s
from hexgen.planner.search import PlanRequest, best_symmetric_plan, plan_cluster
from hexgen.planner.validate import validate_plan
from hexgen.sim.plots import plot_lines
from hexgen.sim.run import replica_models
from hexgen.sim.simulator import simulate
from hexgen.sim.sweep import lowest_scale, peak_rate
from hexgen.sim.workload import TokenLengths, WorkloadSpec, generate_requests

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "examples" / "clusters"
PEAK_SLO_SCALES = [5.0, 10.0]
CFG = CostConfig()


@dataclass(frozen=True)
class Setting:
    """One way of serving: the batch limit and dispatch policy, and the rates the comparisons are made at."""

    name: str
    max_batch: int
    dispatch: str
    rates: tuple[float, ...]  # "lowest SLO scale for 99%" is read at these
    peak_plan_rates: tuple[float, ...]  # plans for "peak rate" are searched at these, the best kept
    peak_range: tuple[float, float]
    sweep_rates: tuple[float, ...]
    num_requests: int = 1000
    min_stream_s: float = 0.0  # streams last at least this long, so a short burst cannot pass for a peak rate

    @property
    def workload(self) -> Workload:
        return Workload(prompt_tokens=128, output_tokens=64, max_batch=self.max_batch)


SETTINGS = {
    "paper": Setting("paper", 1, "round-robin", (0.25, 0.5, 1.0, 2.0), (0.5, 1.0, 2.0, 4.0), (0.05, 16.0),
                     (0.25, 0.5, 1, 1.5, 2, 3, 4)),
    "batching": Setting("batching", SchedulerConfig().max_running_seqs, "capacity-weighted", (0.5, 2.0, 8.0, 16.0),
                        (16.0, 48.0), (0.5, 128.0), (1, 2, 4, 8, 16, 32, 64), num_requests=600, min_stream_s=60.0),
}


@dataclass
class Context:
    model: ModelSpec
    reference_s: float
    progress: Progress
    setting: Setting
    plans: dict[tuple, DeploymentPlan] = field(default_factory=dict)
    plan_times_s: list[float] = field(default_factory=list)  # every search of the 58-GPU cluster


def latencies(plan: DeploymentPlan, cluster: Cluster, ctx: Context, rate: float, seed: int = 1) -> np.ndarray:
    st = ctx.setting
    count = max(st.num_requests, round(rate * st.min_stream_s))
    spec = WorkloadSpec(rate, count, TokenLengths.fixed(128), TokenLengths.fixed(64))
    models = replica_models(plan, cluster, ctx.model, CFG, st.max_batch, st.workload)
    done = simulate(models, generate_requests(spec, random.Random(seed)), make_policy(st.dispatch))
    return np.array([c.latency_s for c in sorted(done, key=lambda c: c.request.arrival_s)])


def sustained_attainment(latencies_s: np.ndarray, deadline_s: float, steady: bool) -> float:
    """Share of requests within the deadline; with `steady`, 0 when a backlog builds up over the stream (the last
    fifth of arrivals waits more than 10% longer on average than the second fifth), so a rate above capacity cannot
    pass for a peak rate by absorbing a finite burst."""
    fifth = len(latencies_s) // 5
    if steady and fifth and latencies_s[-fifth:].mean() > 1.1 * latencies_s[fifth:2 * fifth].mean():
        return 0.0
    return float(np.mean(latencies_s <= deadline_s))


def planned(cluster: Cluster, ctx: Context, rate: float, slo_scale: float, objective: str) -> DeploymentPlan:
    """The planner's plan for this rate, deadline and objective (memoised: sweeps reuse plans)."""
    key = (id(cluster), rate, slo_scale, objective)
    if key not in ctx.plans:
        st = ctx.setting
        request = PlanRequest(rate, slo_scale * ctx.reference_s, st.workload, st.num_requests, st.dispatch,
                              objective=objective)
        result = plan_cluster(cluster, ctx.model, request, CFG)
        if cluster.num_gpus == 58:
            ctx.plan_times_s.append(result.elapsed_s)
        validate_plan(result.plan, ctx.model, cluster, st.workload, CFG)
        ctx.plans[key] = result.plan
    return ctx.plans[key]


def best_symmetric(cluster: Cluster, ctx: Context, rate: float, slo_scale: float, objective: str) -> DeploymentPlan:
    """The best symmetric layout (one TP degree, even layers, identical shapes) under the planner's own objective,
    request stream and choice of which replicas to run."""
    key = (id(cluster), rate, slo_scale, objective, "symmetric")
    if key not in ctx.plans:
        st = ctx.setting
        request = PlanRequest(rate, slo_scale * ctx.reference_s, st.workload, st.num_requests, st.dispatch,
                              objective=objective)
        ctx.plans[key] = best_symmetric_plan(cluster, ctx.model, request, CFG)[0]
    return ctx.plans[key]


def compare(systems: dict[str, tuple[Cluster, object]], ctx: Context) -> dict[str, dict]:
    """For each system (cluster, plan maker): lowest 99% SLO scale per rate and peak rate per SLO scale."""
    st = ctx.setting
    out: dict[str, dict] = {}
    task = ctx.progress.add_task(f"{st.name}: comparing", total=len(systems) * (len(st.rates) + len(PEAK_SLO_SCALES)))
    for name, (cluster, make) in systems.items():
        row: dict = {"scale": {}, "peak": {}, "cost": cluster.cost_per_hour, "gpus": cluster.num_gpus, "plans": {}}
        for rate in st.rates:
            plan = make(cluster, ctx, rate, 5.0, "tail")
            row["scale"][f"{rate:g}"] = lowest_scale(latencies(plan, cluster, ctx, rate), ctx.reference_s)
            row["plans"][f"tail objective at {rate:g} req/s"] = describe(plan)
            ctx.progress.advance(task)
        for scale in PEAK_SLO_SCALES:
            plans = [make(cluster, ctx, r, scale, "attainment") for r in st.peak_plan_rates]
            for r, plan in zip(st.peak_plan_rates, plans, strict=True):
                row["plans"][f"attainment objective at {r:g} req/s, SLO scale {scale:g}"] = describe(plan)
            deadline_s = scale * ctx.reference_s
            row["peak"][f"{scale:g}"] = max(
                peak_rate(lambda r, p=p, c=cluster, d=deadline_s: sustained_attainment(
                    latencies(p, c, ctx, r), d, st.min_stream_s > 0), *st.peak_range, steps=7)
                for p in plans
            )
            ctx.progress.advance(task)
        out[name] = row
    return out


def describe(plan: DeploymentPlan) -> list[str]:
    """One line per replica: its stages (machine, TP, layers) and predicted batch and throughput."""
    lines = []
    for replica in plan.replicas:
        stages = " -> ".join(f"{s.machine} TP {s.tp} x {s.num_layers}" for s in replica.stages)
        p = replica.predicted
        lines.append(f"{stages} (batch {p.get('max_batch', 1):g}, {p.get('throughput_rps', 0):.2f} req/s)")
    return lines


def case_study(ctx: Context) -> list[tuple[str, str, str]]:
    cluster = load_cluster(CLUSTERS / "case-study.yaml")
    a6, a5, a4 = "a6000-0", "a5000-0", "a4000-0"
    all8 = (a6,) * 4 + (a5,) * 2 + (a4,) * 2
    workload = ctx.setting.workload
    layouts = {
        "TP 8 over all GPUs": [FixedStage(all8, 80)],
        "even 8-stage pipeline (10 layers per GPU)": [FixedStage((m,), 10) for m in all8],
        "2 stages x TP 4, even 40/40": [FixedStage((a6,) * 4, 40), FixedStage((a5, a5, a4, a4), 40)],
        "paper's plan: TP 4/2/2, layers 48/20/12": [FixedStage((a6,) * 4, 48), FixedStage((a5,) * 2, 20),
                                                    FixedStage((a4,) * 2, 12)],
    }
    fitting = [(n, fixed_layout_latency_s(cluster, ctx.model, [FixedStage((a6,) * 4, 80 - n),
                                                                FixedStage((a5, a5, a4, a4), n)], workload, CFG))
               for n in range(1, 80)]
    n, _ = min((x for x in fitting if not x[1][1]), key=lambda x: x[1][0])
    layouts["2 stages x TP 4, best split that fits"] = [FixedStage((a6,) * 4, 80 - n), FixedStage((a5, a5, a4, a4), n)]
    rows = []
    for name, stages in layouts.items():
        latency, oom = fixed_layout_latency_s(cluster, ctx.model, stages, workload, CFG)
        split = "/".join(str(s.num_layers) for s in stages)
        rows.append((f"{name} [{split}]", f"{latency:.2f}", "out of memory: " + "; ".join(oom) if oom else "fits"))
    plan = planned(cluster, ctx, 0.1, 5.0, "tail")
    for r, replica in enumerate(plan.replicas):
        shape = ", ".join(f"{s.machine} TP {s.tp} x {s.num_layers} layers" for s in replica.stages)
        rows.append((f"planner, replica {r}: {shape}", f"{replica.predicted['latency_s']:.2f}", "fits"))
    return rows


def plots(systems: dict[str, tuple[Cluster, object]], ctx: Context, figures: Path) -> list[str]:
    st = ctx.setting
    scales = [1, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30]
    scale_rate = st.rates[1]
    by_scale, by_rate = {}, {}
    task = ctx.progress.add_task(f"{st.name}: plotting", total=len(systems) * (1 + len(st.sweep_rates)))
    for name, (cluster, make) in systems.items():
        lat = latencies(make(cluster, ctx, scale_rate, 5.0, "tail"), cluster, ctx, scale_rate)
        by_scale[name] = [float(np.mean(lat <= s * ctx.reference_s)) for s in scales]
        ctx.progress.advance(task)
        by_rate[name] = []
        for rate in st.sweep_rates:
            lat = latencies(make(cluster, ctx, rate, 5.0, "attainment"), cluster, ctx, rate)
            by_rate[name].append(float(np.mean(lat <= 5.0 * ctx.reference_s)))
            ctx.progress.advance(task)
    label = "one request at a time" if st.max_batch == 1 else f"batching engine (batch {st.max_batch})"
    paths = [
        plot_lines(figures / f"{st.name}_slo_vs_scale.png", scales, by_scale, log_x=True,
                   xlabel="SLO scale (x reference latency)", ylabel="SLO attainment",
                   title=f"Llama-2-70B, {scale_rate:g} req/s, {label}"),
        plot_lines(figures / f"{st.name}_slo_vs_rate.png", list(st.sweep_rates), by_rate, log_x=st.max_batch > 1,
                   xlabel="request rate (req/s)", ylabel="SLO attainment", title=f"Llama-2-70B, SLO scale 5, {label}"),
    ]
    return [p.name for p in paths]


def run_setting(setting: Setting, model: ModelSpec, reference_s: float, progress: Progress, out: Path) -> dict:
    start = time.perf_counter()
    ctx = Context(model, reference_s, progress, setting)
    full, half = load_cluster(CLUSTERS / "hetero-full.yaml"), load_cluster(CLUSTERS / "hetero-half.yaml")
    a100 = load_cluster(CLUSTERS / "a100-homogeneous.yaml")
    cases = case_study(ctx)
    systems = {"HexGen, full budget (58 GPUs)": (full, planned), "HexGen, half budget (30 GPUs)": (half, planned),
               "A100 x 16 (homogeneous)": (a100, planned), "symmetric, full budget": (full, best_symmetric)}
    results = compare(systems, ctx)
    figures = plots(systems, ctx, out / "figures")
    return {"setting": setting.__dict__, "cases": cases, "results": results, "figures": figures,
            "plan_times_s": ctx.plan_times_s, "runtime_s": time.perf_counter() - start}


def replica_figures(model: ModelSpec) -> dict[str, dict[str, float]]:
    """Why the batching results come out as they do: a TP-8 replica's decode step on each GPU type, in ms."""
    out = {}
    for path, machine in (("a100-homogeneous.yaml", "p4d-0"), ("hetero-full.yaml", "is-3090ti-0"),
                          ("hetero-full.yaml", "il-a6000-0"), ("hetero-full.yaml", "nv-a5000-0")):
        cluster = load_cluster(CLUSTERS / path)
        gpu, link = cluster.machine(machine).gpu, cluster.tp_link(machine)
        stage = StagePlacement(machine, gpu, 8, model.num_layers, link)
        cost = replica_stage_costs(cluster, model, [stage], CFG, SETTINGS["batching"].workload)
        layer = layer_cost(model, gpu, 8, link, CFG)
        out[gpu.name] = {
            "scan_ms": model.num_layers * model.params_per_layer * CFG.dtype_bytes / (
                8 * gpu.memory_bytes_per_s(CFG.memory_efficiency)) * 1e3,
            "allreduce_ms": model.num_layers * 2 * allreduce_s(link, 8, 0.0) * 1e3,
            "per_seq_ms": model.num_layers * layer.decode_per_seq_s * 1e3,
            "token_1_ms": cost.decode_token_s(1, 160) * 1e3, "token_64_ms": cost.decode_token_s(64, 160) * 1e3,
            "capacity_rps": cost.capacity_rps(64, 128, 64), "alone_s": cost.request_latency_s(128, 64),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs"), help="where results.md, results.json and figures/ go")
    parser.add_argument("--only", choices=sorted(SETTINGS), help="re-run one setting, keep the other's stored results")
    parser.add_argument("--report-only", action="store_true", help="re-write results.md from results.json")
    args = parser.parse_args()
    out = Path(args.out)
    store = out / "results.json"
    stored = json.loads(store.read_text()) if (args.only or args.report_only) and store.is_file() else {}
    model = load_model_spec("llama-2-70b")
    if not args.report_only:
        reference_s = reference_latency_s(model, SETTINGS["paper"].workload, CFG, builtin_gpu_types()["A100-40G"])
        with Progress(console=Console()) as progress:
            for name in [args.only] if args.only else list(SETTINGS):
                stored[name] = run_setting(SETTINGS[name], model, reference_s, progress, out)
        stored["reference_s"], stored["cpu"] = reference_s, cpu_description()
        stored["load_average_1m"] = round(os.getloadavg()[0], 1)  # other work on the machine slows the searches
    stored["replica_figures"] = replica_figures(model)
    store.write_text(json.dumps(stored, indent=1) + "\n")
    write_report(out / "results.md", stored)


if __name__ == "__main__":
    main()
