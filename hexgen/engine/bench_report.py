"""Run the engine benchmark for each dtype and print (and optionally save) its tables."""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hexgen.engine.bench import BenchConfig, Timing, bench_context, collective_costs, compare_single, time_layout
from hexgen.engine.bench_batch import BatchedResult, run_batched
from hexgen.engine.bench_shapes import build_random_checkpoint
from hexgen.engine.checkpoint import ModelSource, resolve_model
from hexgen.engine.engine import DTYPES
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
    device: str = "cpu",
    shape: str | None = None,
    batch_sizes: list[int] | None = None,
    save_model: str | None = None,
    enforce_eager: bool = False,
) -> None:
    """CPU: single process vs HF, layouts, collectives; `batch_sizes` (always on CUDA): the decode-step table.
    With `shape`, the random checkpoint is built in a scratch folder, or kept in `save_model` (for `hexgen serve`)."""
    with tempfile.TemporaryDirectory(prefix="hexgen-bench-") as scratch:
        if shape:  # built in the first dtype; each run converts it to its own on load
            folder = Path(save_model or scratch)  # save_pretrained creates a missing folder
            source = build_random_checkpoint(shape, DTYPES[dtypes[0]], torch.device(device), folder)
        else:
            source = resolve_model(model)
        console, sections = Console(), [_header(source.name, device, prompt_tokens, new_tokens, repeats)]
        for dtype in dtypes:
            cfg = BenchConfig(prompt_tokens, new_tokens, repeats, dtype, tuple(layouts or ()), enforce_eager)
            bench_context(source.spec, cfg)  # tokens that do not fit the model: refused before anything runs
            tables = [] if device == "cuda" else _cpu_tables(source, cfg, layouts)
            if batch_sizes:
                batched = _run_batched(source, cfg, device, batch_sizes)
                tables += [_batched_table(dtype, batched), _largest_kernels_table(dtype, batched)]
            for table in tables:
                console.print(table)
                sections.append(_markdown(table))
    if markdown_path:
        Path(markdown_path).write_text("\n".join(sections))
        console.print(f"wrote {markdown_path}")


def _header(name: str, device: str, prompt_tokens: int, new_tokens: int, repeats: int) -> str:
    machine = cpu_description()
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()} (torch {torch.__version__}), host {machine}"
    return (
        f"# `hexgen bench engine` — {name}, prompt {prompt_tokens} tokens, {new_tokens} new tokens, "
        f"median of {repeats}\n\nMade by `hexgen bench engine` (`make bench` writes this file); its options: "
        f"`hexgen bench engine --help`.\n\nMachine: {machine}; {datetime.date.today()}\n"
    )


def _run_batched(source: ModelSource, cfg: BenchConfig, device: str, batch_sizes: list[int]) -> BatchedResult:
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"decode steps {cfg.dtype} on {device}", total=2 * len(batch_sizes))
        return run_batched(source, cfg, torch.device(device), batch_sizes, lambda: bar.advance(task))


def layout_flag(tp: tuple[int, ...], layers: tuple[int, ...] | None) -> str:
    """A layout as the user gave it to --layout, for error messages: `--layout "3 1:20 10"`."""
    counts = f":{' '.join(map(str, layers))}" if layers else ""
    return f'--layout "{" ".join(map(str, tp))}{counts}"'


def _cpu_tables(source: ModelSource, cfg: BenchConfig, layouts: Layouts | None) -> list[Table]:
    """Single process vs HF, multi-process layouts and the cost of splitting, as before on CPU."""
    layouts = layouts or default_layouts(source)
    for tp, layers in layouts:  # reject a bad layout before anything runs
        single_replica_plan(source.spec, list(tp), list(layers) if layers else None, layout_flag(tp, layers))
    cfg = BenchConfig(cfg.prompt_tokens, cfg.new_tokens, cfg.repeats, cfg.dtype, tuple(layouts))
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"bench {cfg.dtype}", total=2 * cfg.repeats + len(layouts) + 1)
        single = compare_single(source, cfg, lambda: bar.advance(task))
        split = []
        for tp, layers in layouts:
            split.append(time_layout(source, cfg, tp, layers))
            bar.advance(task)
        widest = max(max(tp) for tp, _ in layouts)
        costs = collective_costs(source, cfg, widest)
        bar.advance(task)
    return [
        _speed_table(f"{cfg.dtype}: single process", single, single[1]),
        _speed_table(f"{cfg.dtype}: multi-process layouts (one process per rank)", split, None),
        _collective_table(f"{cfg.dtype}: cost of splitting (gloo, 1 thread per rank)", costs),
    ]


def _batched_table(dtype: str, result: BatchedResult) -> Table:
    ops = "kernels" if result.device_name != "CPU" else "torch ops"
    weights_gb = result.weight_bytes_read / 1e9
    table = Table(
        title=f"{dtype} on {result.device_name}, hexgen {result.engine_mode}: decode steps (batch 1: ms/token); "
        f"floor = {weights_gb:.3g} GB of "
        f"weights + the KV cache, read at {result.copy_gbps:.0f} GB/s (measured copy, read + write)"
    )
    busy = "hexgen GPU busy ms/step" if result.device_name != "CPU" else "hexgen ms in torch ops / step"
    serial = any(row.serial_ms is not None for row in result.rows)  # the engine overlapped its steps
    columns = ("batch", "hexgen ms/step", "hexgen tok/s", "HF ms/step", "HF tok/s", "floor ms/step",
               "hexgen / floor", f"hexgen {ops} / layer / step", busy,
               *(["hexgen ms/step, steps in series"] if serial else []))
    for col in columns:
        table.add_column(col, justify="right")
    for row in result.rows:
        table.add_row(
            str(row.batch), f"{row.hexgen_ms:.2f}", f"{1000 * row.batch / row.hexgen_ms:.0f}", f"{row.hf_ms:.2f}",
            f"{1000 * row.batch / row.hf_ms:.0f}", f"{row.floor_ms:.2f}", f"{row.hexgen_ms / row.floor_ms:.1f}x",
            f"{row.hexgen_ops_per_layer:.1f}", f"{row.profile.busy_ms:.2f}",
            *([f"{row.serial_ms:.2f}" if row.serial_ms is not None else "-"] if serial else []),
        )
    return table


def _largest_kernels_table(dtype: str, result: BatchedResult) -> Table:
    """Where a decode step's time goes, at the smallest and the largest batch timed."""
    what = "kernels" if result.device_name != "CPU" else "top-level torch ops"
    table = Table(title=f"{dtype} on {result.device_name}, hexgen {result.engine_mode}: the {what} with the most "
                  "time in a decode step (torch.profiler over a few steps; times inclusive of what they call)")
    for col in ("batch", "name", "ms / step", "calls / step", "share of the step"):
        table.add_column(col, justify="left" if col == "name" else "right")
    rows = result.rows if len(result.rows) < 3 else [result.rows[0], result.rows[-1]]
    for row in rows:
        for share in row.profile.largest:
            table.add_row(str(row.batch), share.name, f"{share.ms_per_step:.3f}", f"{share.calls_per_step:.0f}",
                          f"{100 * share.ms_per_step / row.hexgen_ms:.0f}%")
    return table


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
