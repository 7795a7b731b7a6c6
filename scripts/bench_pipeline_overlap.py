"""Pipeline stages working on different micro-batches at once, against the same stages taking turns, on CPU cores
standing in for GPUs: every rank gets one thread, so each stage of a two-stage replica has a core of its own, as it
would have a GPU of its own. Usage: .venv/bin/python scripts/bench_pipeline_overlap.py [-h].

Each case serves the same requests (all submitted at once, at most --streams sequences running) with the engine
alone (no HTTP), and output tokens per second are compared round by round with the one-rank engine on one core. In
the overlapping cases the driver keeps one micro-batch per stage in flight (what `hexgen serve` does for stages
on their own GPUs or machines); taking turns keeps one (what it does for stages sharing one machine's cores). The
table goes to stdout and, with --markdown, to a file.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Case:
    label: str
    layers: tuple[int, ...]  # per stage, TP 1 each
    depth: int  # micro-batches in flight


CASES = [
    Case("one rank, 30 layers (one core)", (30,), 1),
    Case("two stages 15 + 15, taking turns", (15, 15), 1),
    Case("two stages 15 + 15, overlapping", (15, 15), 2),
    Case("two stages 18 + 12 (balanced, the LM head on the second), taking turns", (18, 12), 1),
    Case("two stages 18 + 12 (balanced, the LM head on the second), overlapping", (18, 12), 2),
]


READING = ("What these figures say and what keeps overlapping stages under twice one core's throughput: README.md, "
           "\"Stages on their own devices work at once\".")


def predicted_tok_s(spec, case: Case, args) -> float | None:
    """The simulator's output tokens per second for `case` under the same closed-loop load: each stage on a core
    of its own (examples/clusters/local-two-cores.yaml) with this machine's one-thread profile. None for stages
    taking turns on one machine's cores (the simulator runs that for shared machines only)."""
    if case.depth == 1 and len(case.layers) > 1:
        return None
    from hexgen.cluster import load_cluster
    from hexgen.costmodel import CostConfig, Workload
    from hexgen.dispatch import make_policy
    from hexgen.plan import plan_from_dict
    from hexgen.profile import apply_profiles, load_profile
    from hexgen.sim.run import replica_models
    from hexgen.sim.simulator import simulate_streams

    cluster = apply_profiles(load_cluster(REPO / "examples/clusters/local-two-cores.yaml"),
                             [load_profile(REPO / "examples/profiles/cpu-epyc-2core-1thread.yaml")])
    bounds = [0]
    for n in case.layers:
        bounds.append(bounds[-1] + n)
    stages = [{"machine": machine, "gpus": [0], "tp": 1, "layers": [bounds[i], bounds[i + 1]]}
              for i, machine in enumerate(["core-a", "core-b"][: len(case.layers)])]
    plan = plan_from_dict({"model": "smollm2-135m", "replicas": [{"stages": stages}]}, case.label)
    models = replica_models(plan, cluster, spec, CostConfig(dtype_bytes=4), args.streams,
                            Workload(args.prompt_tokens, args.new_tokens, args.streams))
    done = simulate_streams(models, args.streams, args.requests, args.prompt_tokens, args.new_tokens,
                            make_policy("least-outstanding"), {}, [1.0])
    return args.requests * args.new_tokens / max(c.finish_s for c in done)


def serve_once(source, case: Case, requests, max_running: int) -> float:
    """Output tokens per second of `requests` on a fresh replica of `case` (load excluded)."""
    from hexgen.engine.generation import run_requests
    from hexgen.engine.messages import GenerationRequest, SamplingParams
    from hexgen.engine.scheduler import SchedulerConfig
    from hexgen.launch.entry import run_rank
    from hexgen.launch.local import LocalReplica
    from hexgen.launch.spec import rank_specs
    from hexgen.plan import single_replica_plan

    plan = single_replica_plan(source.spec, [1] * len(case.layers), list(case.layers))
    specs = rank_specs(source, plan.replicas[0], "float32", "cpu", threads_per_rank=1)
    specs = [replace(s, layout=replace(s.layout, depth=case.depth), num_threads=1) for s in specs]
    config = SchedulerConfig(max_running_seqs=max_running, max_context=1024, prefix_caching=False)
    replica = LocalReplica(run_rank, [(s, config, ()) for s in specs])
    try:
        replica.start()
        run_requests(replica, [GenerationRequest("warm", requests[0].prompt_token_ids, SamplingParams(4))])
        start = time.monotonic()
        done = run_requests(replica, requests)
        elapsed = time.monotonic() - start
    finally:
        replica.close()
    return sum(len(c.token_ids) for c in done) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="every case once per round, round-robin")
    parser.add_argument("--streams", type=int, default=32, help="sequences running at once (--max-batch)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    for name in ("rounds", "streams", "requests", "prompt_tokens", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    from rich.console import Console
    from rich.progress import Progress

    from hexgen.engine.checkpoint import resolve_model
    from hexgen.engine.messages import GenerationRequest, SamplingParams
    from hexgen.machine import cpu_description

    source = resolve_model("smollm2-135m")
    vocab = source.spec.vocab_size
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    requests = [GenerationRequest(f"r{i}", tuple((97 * i + 13 * j) % (vocab - 300) + 200
                                                 for j in range(args.prompt_tokens)), params)
                for i in range(args.requests)]
    results: dict[str, list[float]] = {c.label: [] for c in CASES}
    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("cases served", total=args.rounds * len(CASES))
        for _ in range(args.rounds):
            for case in CASES:
                results[case.label].append(serve_once(source, case, requests, args.streams))
                bar.advance(task)

    base = results[CASES[0].label]

    def predicted(case: Case) -> str:
        tok_s = predicted_tok_s(source.spec, case, args)
        if tok_s is None:
            return "-"
        return f"{tok_s:.1f} ({tok_s / statistics.median(results[case.label]) - 1:+.0%})"

    lines = [
        f"Machine: {cpu_description()}; {datetime.date.today()}; SmolLM2-135M fp32, {args.requests} requests of "
        f"{args.prompt_tokens} prompt + {args.new_tokens} output tokens, at most {args.streams} running, one thread "
        f"per rank, median of {args.rounds} rounds (command: `.venv/bin/python scripts/bench_pipeline_overlap.py "
        f"--rounds {args.rounds}`).",
        "",
        "| case | output tok/s (median) | rounds | vs one rank on one core, round by round | simulator's prediction |",
        "|---|---|---|---|---|",
    ]
    for case in CASES:
        values = results[case.label]
        ratios = ", ".join(f"{v / b:.2f}" for v, b in zip(values, base, strict=True))
        lines.append(f"| {case.label} | {statistics.median(values):.1f} | "
                     f"{' / '.join(f'{v:.1f}' for v in values)} | {ratios} | {predicted(case)} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(f"# Pipeline stages overlapping vs taking turns (CPU cores as devices)\n\n{table}\n\n"
                                 f"{READING}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
