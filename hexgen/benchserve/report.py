"""Presenting a run: a rich progress bar while it runs, a rich table after, and a JSON file on request."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hexgen.benchserve.client import RequestResult
from hexgen.benchserve.config import BenchConfig
from hexgen.benchserve.loadgen import RunResult
from hexgen.benchserve.metrics import Summary


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(), console=console, transient=True)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.1f}"


def render_table(config: BenchConfig, summary: Summary) -> Table:
    title = f"{config.model} at {config.base_url}{config.endpoint}, {config.mode}, max_tokens {config.max_tokens}"
    table = Table(title=title)
    table.add_column("metric")
    for name in ("mean", "p50", "p90", "p99"):
        table.add_column(name, justify="right")
    for label, dist in (("TTFT (ms)", summary.ttft_s), ("TPOT (ms)", summary.tpot_s), ("e2e (ms)", summary.e2e_s)):
        table.add_row(label, _ms(dist.mean), _ms(dist.p50), _ms(dist.p90), _ms(dist.p99))
    table.add_section()
    table.add_row("requests ok / failed", f"{summary.completed} / {summary.failed}", "", "", "")
    table.add_row("duration (s)", f"{summary.duration_s:.2f}", "", "", "")
    table.add_row("request throughput (req/s)", f"{summary.request_throughput_rps:.2f}", "", "", "")
    table.add_row(f"output tokens/s (tokens from {summary.tokens_source})",
                  f"{summary.output_throughput_tps:.1f}", "", "", "")
    table.add_row("mean output tokens / request",
                  f"{summary.output_tokens / summary.completed:.1f}" if summary.completed else "-", "", "", "")
    if summary.short_requests:
        table.add_row("[yellow]requests ending before max_tokens[/yellow]", str(summary.short_requests), "", "", "")
    if summary.slo_attainment is not None:
        slo = config.slo
        targets = ", ".join(f"{n} <= {v:g} s" for n, v in (("TTFT", slo.ttft_s), ("TPOT", slo.tpot_s),
                                                            ("e2e", slo.e2e_s)) if v is not None)
        table.add_row(f"SLO attainment ({targets})", f"{summary.slo_attainment:.1%}", "", "", "")
    engine = summary.engine
    if engine is not None:
        table.add_section()
        replicas = f"{engine.replicas} replica{'s' if engine.replicas > 1 else ''}"
        table.add_row(f"server: engine steps ({replicas})", str(engine.steps), "", "", "")
        table.add_row("server: mean step (ms)", f"{engine.mean_step_ms:.2f}", "", "", "")
        table.add_row("server: tokens per step (sampled)",
                      f"{engine.tokens_per_step:.1f} ({engine.sampled_per_step:.1f})", "", "", "")
        table.add_row("server: drivers busy stepping", f"{engine.busy_fraction:.0%}", "", "", "")
    return table


def print_report(console: Console, run: RunResult, summary: Summary) -> None:
    console.print(render_table(run.config, summary))
    for message, count in summary.errors:
        console.print(f"[red]{count} x[/red] {message}")


def _request_row(result: RequestResult) -> dict:
    return {**dataclasses.asdict(result), "tpot_s": result.tpot_s}


def _finite(value):
    """NaN (a metric with no samples) becomes null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | Path, run: RunResult, summary: Summary) -> None:
    """Config (API key masked), summary and every request, so a run can be re-analysed later."""
    config = dataclasses.asdict(run.config)
    if config["api_key"]:
        config["api_key"] = "***"
    summary_fields = dataclasses.asdict(summary)
    summary_fields["engine"] = summary.engine.as_dict() if summary.engine is not None else None
    document = {"config": config, "summary": summary_fields,
                "requests": [_request_row(r) for r in run.requests]}
    Path(path).write_text(json.dumps(_finite(document), indent=2) + "\n")
