"""Reproduce the HexGen paper's comparisons in simulation; writes docs/results.md and docs/figures/*.png.

    .venv/bin/python scripts/reproduce_paper.py            # about a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from reproduce_report import write_report
from rich.console import Console
from rich.progress import Progress

from hexgen.cluster import Cluster, builtin_gpu_types, load_cluster
from hexgen.costmodel import CostConfig, Workload
from hexgen.dispatch import make_policy
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
WORKLOAD = Workload(prompt_tokens=128, output_tokens=64, max_batch=1)
NUM_REQUESTS = 1000
RATES = [0.25, 0.5, 1.0, 2.0]
PEAK_SLO_SCALES = [5.0, 10.0]
CFG = CostConfig()


@dataclass
class Context:
    model: ModelSpec
    reference_s: float
    progress: Progress


def latencies(plan: DeploymentPlan, cluster: Cluster, model: ModelSpec, rate: float, seed: int = 1) -> np.ndarray:
    spec = WorkloadSpec(rate, NUM_REQUESTS, TokenLengths.fixed(WORKLOAD.prompt_tokens),
                        TokenLengths.fixed(WORKLOAD.output_tokens))
    done = simulate(replica_models(plan, cluster, model, CFG), generate_requests(spec, random.Random(seed)),
                    make_policy("round-robin"))
    return np.array([c.latency_s for c in done])


_PLANS: dict[tuple, DeploymentPlan] = {}
PLAN_TIMES_S: list[float] = []  # every search of the 58-GPU cluster


def planned(cluster: Cluster, ctx: Context, rate: float, slo_scale: float, objective: str) -> DeploymentPlan:
    """The planner's plan for this rate, deadline and objective (memoised: sweeps reuse plans)."""
    key = (id(cluster), rate, slo_scale, objective)
    if key not in _PLANS:
        request = PlanRequest(rate, slo_scale * ctx.reference_s, WORKLOAD, NUM_REQUESTS, objective=objective)
        result = plan_cluster(cluster, ctx.model, request, CFG)
        if cluster.num_gpus == 58:
            PLAN_TIMES_S.append(result.elapsed_s)
        validate_plan(result.plan, ctx.model, cluster, WORKLOAD, CFG)
        _PLANS[key] = result.plan
    return _PLANS[key]


def best_symmetric(cluster: Cluster, ctx: Context, rate: float, slo_scale: float, objective: str) -> DeploymentPlan:
    """The best symmetric layout (one TP degree, even layers, identical shapes) under the planner's own objective,
    request stream and choice of which replicas to run."""
    key = (id(cluster), rate, slo_scale, objective, "symmetric")
    if key not in _PLANS:
        request = PlanRequest(rate, slo_scale * ctx.reference_s, WORKLOAD, NUM_REQUESTS, objective=objective)
        _PLANS[key] = best_symmetric_plan(cluster, ctx.model, request, CFG)[0]
    return _PLANS[key]


def compare(systems: dict[str, tuple[Cluster, object]], ctx: Context) -> dict[str, dict]:
    """For each system (cluster, plan maker): lowest 99% SLO scale per rate and peak rate per SLO scale."""
    out: dict[str, dict] = {}
    task = ctx.progress.add_task("comparing", total=len(systems) * (len(RATES) + len(PEAK_SLO_SCALES)))
    for name, (cluster, make) in systems.items():
        row: dict = {"scale": {}, "peak": {}, "cost": cluster.cost_per_hour, "gpus": cluster.num_gpus}
        for rate in RATES:
            plan = make(cluster, ctx, rate, 5.0, "tail")
            row["scale"][rate] = lowest_scale(latencies(plan, cluster, ctx.model, rate), ctx.reference_s)
            ctx.progress.advance(task)
        for scale in PEAK_SLO_SCALES:
            plans = [make(cluster, ctx, r, scale, "attainment") for r in (0.5, 1.0, 2.0, 4.0)]
            deadline_s = scale * ctx.reference_s
            row["peak"][scale] = max(
                peak_rate(lambda r, p=p, c=cluster, d=deadline_s: float(np.mean(latencies(p, c, ctx.model, r) <= d)),
                          0.05, 16.0)
                for p in plans
            )
            ctx.progress.advance(task)
        out[name] = row
    return out


def case_study(ctx: Context) -> list[tuple[str, str, str]]:
    cluster = load_cluster(CLUSTERS / "case-study.yaml")
    a6, a5, a4 = "a6000-0", "a5000-0", "a4000-0"
    all8 = (a6,) * 4 + (a5,) * 2 + (a4,) * 2
    layouts = {
        "TP 8 over all GPUs": [FixedStage(all8, 80)],
        "even 8-stage pipeline (10 layers per GPU)": [FixedStage((m,), 10) for m in all8],
        "2 stages x TP 4, even 40/40": [FixedStage((a6,) * 4, 40), FixedStage((a5, a5, a4, a4), 40)],
        "2 stages x TP 4, best split that fits": None,
        "paper's plan: TP 4/2/2, layers 48/20/12": [FixedStage((a6,) * 4, 48), FixedStage((a5,) * 2, 20),
                                                    FixedStage((a4,) * 2, 12)],
    }
    fitting = [(n, fixed_layout_latency_s(cluster, ctx.model, [FixedStage((a6,) * 4, 80 - n),
                                                                FixedStage((a5, a5, a4, a4), n)], WORKLOAD, CFG))
               for n in range(1, 80)]
    n, _ = min((x for x in fitting if not x[1][1]), key=lambda x: x[1][0])
    layouts["2 stages x TP 4, best split that fits"] = [FixedStage((a6,) * 4, 80 - n),
                                                         FixedStage((a5, a5, a4, a4), n)]
    rows = []
    for name, stages in layouts.items():
        latency, oom = fixed_layout_latency_s(cluster, ctx.model, stages, WORKLOAD, CFG)
        split = "/".join(str(s.num_layers) for s in stages)
        rows.append((f"{name} [{split}]", f"{latency:.2f}", "out of memory: " + "; ".join(oom) if oom else "fits"))
    plan = planned(cluster, ctx, 0.1, 5.0, "tail")
    for r, replica in enumerate(plan.replicas):
        shape = ", ".join(f"{s.machine} TP {s.tp} x {s.num_layers} layers" for s in replica.stages)
        rows.append((f"planner, replica {r}: {shape}", f"{replica.predicted['latency_s']:.2f}", "fits"))
    return rows


def plots(systems: dict[str, tuple[Cluster, object]], ctx: Context, figures: Path) -> list[Path]:
    scales = [1, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30]
    by_scale, by_rate = {}, {}
    rates = [0.25, 0.5, 1, 1.5, 2, 3, 4]
    task = ctx.progress.add_task("plotting sweeps", total=len(systems) * (1 + len(rates)))
    for name, (cluster, make) in systems.items():
        lat = latencies(make(cluster, ctx, 1.0, 5.0, "tail"), cluster, ctx.model, 1.0)
        by_scale[name] = [float(np.mean(lat <= s * ctx.reference_s)) for s in scales]
        ctx.progress.advance(task)
        by_rate[name] = []
        for rate in rates:
            lat = latencies(make(cluster, ctx, rate, 5.0, "attainment"), cluster, ctx.model, rate)
            by_rate[name].append(float(np.mean(lat <= 5.0 * ctx.reference_s)))
            ctx.progress.advance(task)
    return [
        plot_lines(figures / "slo_vs_scale.png", scales, by_scale, xlabel="SLO scale (x reference latency)",
                   ylabel="SLO attainment", title="Llama-2-70B, 1 req/s", log_x=True),
        plot_lines(figures / "slo_vs_rate.png", rates, by_rate, xlabel="request rate (req/s)",
                   ylabel="SLO attainment", title="Llama-2-70B, SLO scale 5"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs"), help="where results.md and figures/ go")
    args = parser.parse_args()
    start = time.perf_counter()
    model = load_model_spec("llama-2-70b")
    reference = reference_latency_s(model, WORKLOAD, CFG, builtin_gpu_types()["A100-40G"])
    full, half = load_cluster(CLUSTERS / "hetero-full.yaml"), load_cluster(CLUSTERS / "hetero-half.yaml")
    a100 = load_cluster(CLUSTERS / "a100-homogeneous.yaml")
    with Progress(console=Console()) as progress:
        ctx = Context(model, reference, progress)
        cases = case_study(ctx)
        systems = {"HexGen, full budget (58 GPUs)": (full, planned), "HexGen, half budget (30 GPUs)": (half, planned),
                   "A100 x 16 (homogeneous)": (a100, planned), "symmetric, full budget": (full, best_symmetric)}
        results = compare(systems, ctx)
        figures = plots(systems, ctx, Path(args.out) / "figures")
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    cpu = f"{cpu}, {os.cpu_count()} cores" if cpu else platform.processor()
    write_report(Path(args.out) / "results.md", reference, PLAN_TIMES_S, cases, results, figures,
                 cpu, time.perf_counter() - start, RATES, PEAK_SLO_SCALES)


if __name__ == "__main__":
    main()
