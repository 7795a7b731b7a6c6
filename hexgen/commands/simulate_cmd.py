"""`hexgen simulate`: SLO attainment, latency, throughput and cost of a plan; optional sweeps with PNG plots."""

from __future__ import annotations

import argparse
import os

from hexgen.commands.arg_types import MAX_REQUESTS, finite_float, model_name, request_count


def register(subparsers) -> None:
    from hexgen.commands.workload_args import add_workload_args

    p = subparsers.add_parser("simulate", help="simulate a plan under a request workload", description=__doc__)
    p.add_argument("--cluster", required=True, help="cluster YAML file")
    p.add_argument("--plan", required=True, help="plan JSON written by `hexgen plan`")
    p.add_argument("--model", type=model_name, help="model preset or config (default: the plan's model)")
    add_workload_args(p)
    p.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"], help="arrival process")
    p.add_argument("--cv", type=finite_float, default=2.0, help="coefficient of variation of gamma inter-arrivals")
    p.add_argument("--requests", type=request_count, default=1000,
                   help=f"requests to simulate, 1 to {MAX_REQUESTS:,} (~0.6 ms each on one core)")
    p.add_argument("--sweep-slo-scales", help="comma-separated SLO scales to plot attainment against")
    p.add_argument("--sweep-rates", help="comma-separated request rates to plot attainment against")
    p.add_argument("--plot-dir", default=".", help="where sweep PNGs go")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.console import Console

    from hexgen.commands.workload_args import (
        cost_config,
        dispatch_policy,
        load_profiled_cluster,
        sizing_workload,
        slo_seconds,
        token_lengths,
    )
    from hexgen.models import load_model_spec
    from hexgen.plan import load_plan
    from hexgen.planner.validate import validate_plan
    from hexgen.sim.metrics import summarise
    from hexgen.sim.run import plan_cost_per_hour, run_plan
    from hexgen.sim.workload import WorkloadSpec

    # every flag is checked before the first simulation, which can take minutes
    slo_scales = _floats(args.sweep_slo_scales, "--sweep-slo-scales") if args.sweep_slo_scales else None
    sweep_rates = _floats(args.sweep_rates, "--sweep-rates") if args.sweep_rates else None
    plot_dir = _plot_dir(args.plot_dir) if slo_scales or sweep_rates else None
    console, cfg = Console(), cost_config(args)
    cluster, plan = load_profiled_cluster(args), load_plan(args.plan)
    model = load_model_spec(args.model or plan.model)
    workload = sizing_workload(args, model, plan.meta)
    dispatch = dispatch_policy(args, workload.max_batch, plan.meta)
    validate_plan(plan, model, cluster, workload, cfg)
    slo_s, reference_s = slo_seconds(args, model, cfg)
    spec = WorkloadSpec(args.rate, args.requests, token_lengths(args.prompt_tokens, "--prompt-tokens"),
                        token_lengths(args.output_tokens, "--output-tokens"), args.arrival, args.cv)

    def completions(rate: float):
        rated = WorkloadSpec(rate, spec.num_requests, spec.prompt, spec.output, spec.arrival, spec.cv)
        return run_plan(plan, cluster, model, rated, dispatch=dispatch, seed=args.seed, cfg=cfg,
                        max_batch=workload.max_batch)

    with console.status(f"simulating {args.requests:,} requests"):
        done = completions(args.rate)
    report = summarise(done, slo_s, plan_cost_per_hour(plan, cluster))
    console.print(_metrics_table(report, reference_s))
    console.print(f"batch limit {workload.max_batch} per replica, {dispatch} dispatch")
    latencies = np.array([c.latency_s for c in done])
    if slo_scales:
        _sweep_slo(args, slo_scales, plot_dir, latencies, reference_s, console)
    if sweep_rates:
        _sweep_rates(args, sweep_rates, plot_dir, completions, slo_s, console)
    return 0


MAX_SWEEP_VALUE = 1e6  # a sweep's rates (req/s) and SLO scales; matplotlib cannot lay out an axis out to 1e308


def _floats(text: str, flag: str) -> list[float]:
    from hexgen.errors import UserError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v <= MAX_SWEEP_VALUE for v in values):
        raise UserError(f"{flag} needs numbers above 0 and at most {MAX_SWEEP_VALUE:g}, got {text!r}")
    return values


def _plot_dir(text: str):
    """The sweeps' folder, made now (parents too) so that a bad one is refused before any simulation."""
    from pathlib import Path

    from hexgen.errors import UserError

    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--plot-dir {text}: cannot make that folder ({err.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"--plot-dir {text}: cannot write there")
    return path


def _metrics_table(report, reference_s: float):
    from rich.table import Table

    table = Table(title="simulated serving")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("requests", f"{report.num_requests}"),
        ("deadline", f"{report.slo_s:.2f} s (reference latency {reference_s:.2f} s)"),
        ("SLO attainment", f"{report.slo_attainment:.1%}"),
        ("latency mean / p50 / p90 / p99", f"{report.latency_mean_s:.2f} / {report.latency_p50_s:.2f} / "
         f"{report.latency_p90_s:.2f} / {report.latency_p99_s:.2f} s"),
        ("throughput", f"{report.throughput_rps:.3f} req/s, {report.output_tokens_per_s:.1f} tokens/s"),
        ("cost", f"${report.cost_per_hour:.2f}/h"),
        ("tokens per dollar", f"{report.tokens_per_dollar:,.0f}" if report.cost_per_hour > 0
         else "- (priced at $0)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _sweep_slo(args, scales: list[float], plot_dir, latencies, reference_s: float, console) -> None:
    from hexgen.sim.plots import plot_lines
    from hexgen.sim.sweep import lowest_scale, slo_curve

    curve = slo_curve(latencies, reference_s, scales)
    path = plot_lines(plot_dir / "slo_attainment_vs_scale.png", scales, {f"rate {args.rate}": curve},
                      xlabel="SLO scale (x reference latency)", ylabel="SLO attainment",
                      title="SLO attainment against SLO scale")
    console.print(f"lowest SLO scale reaching 99%: {lowest_scale(latencies, reference_s):.2f}; wrote {path}")


def _sweep_rates(args, rates: list[float], plot_dir, completions, slo_s: float, console) -> None:
    import numpy as np
    from rich.progress import track

    from hexgen.sim.metrics import attainment
    from hexgen.sim.plots import plot_lines

    curve = []
    for rate in track(rates, description="sweeping rates", console=console, transient=True):
        curve.append(attainment(np.array([c.latency_s for c in completions(rate)]), slo_s))
    path = plot_lines(plot_dir / "slo_attainment_vs_rate.png", rates, {f"SLO {slo_s:.1f} s": curve},
                      xlabel="request rate (req/s)", ylabel="SLO attainment", title="SLO attainment against rate")
    pairs = ", ".join(f"{r:g}: {a:.1%}" for r, a in zip(rates, curve, strict=True))
    console.print(f"attainment by rate: {pairs}; wrote {path}")
