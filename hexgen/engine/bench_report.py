"""Run the engine benchmark for each dtype and print (and optionally save) its tables."""

from __future__ import annotations

import datetime
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hexgen.engine.bench import BenchConfig, Timing, collective_costs, compare_single, time_layout
from hexgen.engine.checkpoint import ModelSource, resolve_model
from hexgen.machine import cpu_description
from hexgen.plan import single_replica_plan

Layouts = list[tuple[tuple[int, ...], tuple[int, ...] | None]]


def default_layouts(source: ModelSource) -> Layouts:
    widest = max(t for t in source.spec.valid_tp_degrees(4))
    layouts: Layouts = [((1, 1), None)]
    if widest > 1:
        third = source.spec.num_layers // 3
        layouts += [((widest,), None), ((widest, 1), (source.spec.num_layers - third, third))]
    return layouts


def run_and_report(
    model: str,
    dtypes: list[str],
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    layouts: Layouts | None,
    markdown_path: str | None,
) -> None:
    source = resolve_model(model)
    layouts = layouts or default_layouts(source)
    for tp, layers in layouts:  # reject a bad layout before anything runs
        single_replica_plan(source.spec, list(tp), list(layers) if layers else None)
    console = Console()
    header = (
        f"# `hexgen bench engine` — {model}, prompt {prompt_tokens} tokens, {new_tokens} new tokens, "
        f"median of {repeats}\n\nMachine: {cpu_description()}; {datetime.date.today()}\n"
    )
    sections = [header]
    for dtype in dtypes:
        cfg = BenchConfig(prompt_tokens, new_tokens, repeats, dtype, tuple(layouts))
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"bench {dtype}", total=2 * repeats + len(layouts) + 1)
            single = compare_single(source, cfg, lambda task=task: bar.advance(task))
            split = []
            for tp, layers in layouts:
                split.append(time_layout(source, cfg, tp, layers))
                bar.advance(task)
            widest = max(max(tp) for tp, _ in layouts)
            costs = collective_costs(source, cfg, widest)
            bar.advance(task)
        tables = [
            _speed_table(f"{dtype}: single process", single, single[1]),
            _speed_table(f"{dtype}: multi-process layouts (one process per rank)", split, None),
            _collective_table(f"{dtype}: cost of splitting (gloo, 1 thread per rank)", costs),
        ]
        for table in tables:
            console.print(table)
            sections.append(_markdown(table))
    if markdown_path:
        Path(markdown_path).write_text("\n".join(sections))
        console.print(f"wrote {markdown_path}")


def _speed_table(title: str, rows: list[Timing], reference: Timing | None) -> Table:
    table = Table(title=title)
    for col in ("engine / layout", "prefill tok/s", "decode ms/token"):
        table.add_column(col, justify="right" if col != "engine / layout" else "left")
    if reference is not None:
        table.add_column("decode speed vs HF", justify="right")
    for row in rows:
        cells = [row.name, f"{row.prefill_tok_s:.0f}", f"{row.decode_ms_per_token:.1f}"]
        if reference is not None:
            cells.append(f"{reference.decode_ms_per_token / row.decode_ms_per_token:.2f}x")
        table.add_row(*cells)
    return table


def _collective_table(title: str, costs: list[tuple[str, int, float]]) -> Table:
    table = Table(title=title)
    for col in ("operation on [T, H]", "T", "median µs"):
        table.add_column(col, justify="left" if col.startswith("operation") else "right")
    for op, tokens, seconds in costs:
        table.add_row(op, f"{tokens} ({'decode' if tokens == 1 else 'prefill'})", f"{seconds * 1e6:.0f}")
    return table


def _markdown(table: Table) -> str:
    columns = [str(c.header) for c in table.columns]
    cells = [[str(c) for c in col._cells] for col in table.columns]
    lines = [f"### {table.title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in zip(*cells, strict=True)]
    return "\n".join(lines) + "\n"
