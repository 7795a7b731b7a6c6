"""Where a decode step's wall time goes: the captured layers' replay against everything around it.

For each context limit (the graphs' block-table width and key splits follow it) and batch size, with every
sequence decoding: the median wall time of `Engine.step()` (device synchronised before and after, as `hexgen bench
engine` times it), the median device time of the batch's graph replay alone (CUDA events), the difference (host
work, the embedding, the logits and sampling, the copies in and out), the same step with the graphs switched off
(eager), and the host functions that take the most time under cProfile.

    python scripts/gpu_step_breakdown.py MODEL_DIR --device cuda --markdown OUT.md
    .venv/bin/python scripts/gpu_step_breakdown.py MODEL_DIR --device cpu --batches 1 4 --contexts 288   # dry run

On CPU there are no graphs: the replay column is left empty and the table is only a check that the script runs.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

from hexgen.engine.bench import HexgenSingle, prompt_ids
from hexgen.engine.bench_batch import start_decoding, stop_decoding
from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.scheduler import SchedulerConfig

PROMPT_TOKENS = 128
TOP_FUNCTIONS = 6


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(run, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def replay_ms(graphs, batch: int, repeats: int) -> float:
    """Device time of one replay of the bucket graph holding `batch` rows (its static inputs as the last step
    left them)."""
    bucket = min(b for b in graphs.buckets if b >= batch)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graphs.replays[bucket]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def top_functions(engine, steps: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, ...)
    largest = sorted(stats.items(), key=lambda item: -item[1][2])[:TOP_FUNCTIONS]
    def name(key: tuple) -> str:  # built-ins are filed under "~"
        return key[2] if key[0] == "~" else f"{Path(key[0]).name}:{key[2]}"

    return "; ".join(f"{name(key)} {1000 * value[2] / steps:.2f}" for key, value in largest)


def measure(single: HexgenSingle, ids: list[int], batch: int, device: torch.device, steps: int) -> dict:
    engine = single.engine
    runner = engine.runner
    names = start_decoding(engine, ids, batch, 4 * steps + 8)  # timed, replayed, profiled and eager steps
    row = {"batch": batch, "step_ms": median_ms(engine.step, device, steps)}
    graphs = runner.graphs
    row["replay_ms"] = replay_ms(graphs, batch, steps) if graphs is not None else None
    row["top"] = top_functions(engine, steps)
    runner.graphs = None
    row["eager_ms"] = median_ms(engine.step, device, steps)
    runner.graphs = graphs
    stop_decoding(engine, names)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[288, 4096],
                        help="context limits: 288 is `hexgen bench engine`'s, 4096 a server's")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    source = resolve_model(args.model_dir, progress=False)
    ids = prompt_ids(source, PROMPT_TOKENS)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"Decode step breakdown, {source.name}, bf16, {where}, prompt {PROMPT_TOKENS} tokens, median of "
             f"{args.steps} steps (`scripts/gpu_step_breakdown.py`)", "",
             "| context limit | batch | step ms | graph replay ms | rest ms | eager step ms "
             "| host functions, ms/step (cProfile) |",
             "|---|---|---|---|---|---|---|"]
    for context in args.contexts:
        # steps in series: the breakdown is of one step's host and device work, which overlapped steps hide
        config = SchedulerConfig(max_running_seqs=max(args.batches), max_context=context, overlap_steps=False)
        single = HexgenSingle(source, "bfloat16", args.device, config)
        measure(single, ids, 2, device, 3)  # warm-up: allocations, kernel compiles
        for batch in args.batches:
            row = measure(single, ids, batch, device, args.steps)
            replay = "" if row["replay_ms"] is None else f"{row['replay_ms']:.2f}"
            rest = "" if row["replay_ms"] is None else f"{row['step_ms'] - row['replay_ms']:.2f}"
            lines.append(f"| {context} | {batch} | {row['step_ms']:.2f} | {replay} | {rest} | {row['eager_ms']:.2f} "
                         f"| {row['top']} |")
            print(lines[-1], flush=True)
        del single
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
