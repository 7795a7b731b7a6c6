"""What it costs two processes to take turns on one machine's cores, with nothing but torch: process A runs the
first half of a model's layers, hands the turn to process B (a named pipe), which runs the second half and hands it
back; against one process running all the layers. This is what a two-stage pipeline on one CPU machine does (its stages
take turns, launch/spec.py:pipeline_depth) without any of hexgen's engine, so the difference is what the turn-taking
itself costs. Usage: .venv/bin/python scripts/bench_turn_taking.py [-h].

Each layer has SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 query and 3 KV heads of 64) and does what a decode
step of hexgen's CPU path does for a batch: the QKV projection, a gather of whole KV blocks from the layer's own
block pool, grouped-query SDPA, the output projection and the MLP. Weights and pools are random (seeded). Each
process spins and keeps its heap as hexgen's CPU ranks do (GOMP_SPINCOUNT, engine/cpu_heap.py), and each of the pair
releases its OpenMP worker threads when its turn ends, as hexgen's stages taking turns do (engine/turns.py; not with
--keep-threads). The table gives the median time of each layer over the steps; the README's "Serving" section reads
it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64
BLOCK = 16  # tokens per KV block


def build_layers(count: int, seed: int, batch: int, blocks_per_seq: int):
    """`count` layers: (qkv, o, gate_up, down weights, KV block pool [blocks, BLOCK, 2, kv, d])."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    qkv_rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    layers = []
    for _ in range(count):
        shapes = ((qkv_rows, HIDDEN), (HIDDEN, HIDDEN), (2 * MLP, HIDDEN), (HIDDEN, MLP))
        weights = [torch.randn(rows, cols, generator=generator) * 0.02 for rows, cols in shapes]
        pool = torch.randn(batch * blocks_per_seq, BLOCK, 2, KV_HEADS, HEAD_DIM, generator=generator)
        layers.append((weights, pool))
    return layers


def layer_forward(x, layer, block_index):
    """One decode layer for a batch: x [B, H] -> [B, H] (residuals included, norms left out)."""
    import torch.nn.functional as F

    (qkv_w, o_w, gate_up_w, down_w), pool = layer
    batch = x.shape[0]
    q = F.linear(x, qkv_w)[:, : HEADS * HEAD_DIM].view(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    gathered = pool.index_select(0, block_index).view(batch, -1, 2, KV_HEADS, HEAD_DIM)
    keys, values = gathered[:, :, 0].transpose(1, 2), gathered[:, :, 1].transpose(1, 2)  # [B, kv, K, d]
    attended = F.scaled_dot_product_attention(q, keys, values).reshape(batch, HIDDEN)
    x = x + F.linear(attended, o_w)
    gate, up = F.linear(x, gate_up_w).split(MLP, dim=-1)
    return x + F.linear(F.silu(gate) * up, down_w)


def run_layers(layers, steps: int, batch: int, blocks_per_seq: int, begin=None, end=None) -> list[list[float]]:
    """Time each layer over `steps` steps (seconds); `begin(step)` / `end(step)` run around each step's layers
    (where a turn begins and ends)."""
    import torch

    from hexgen.engine.cpu_heap import keep_freed_memory

    keep_freed_memory()
    block_index = torch.arange(batch * blocks_per_seq)  # each sequence's blocks, all full
    x = torch.randn(batch, HIDDEN, generator=torch.Generator().manual_seed(1))
    times: list[list[float]] = [[] for _ in layers]
    with torch.inference_mode():
        for step in range(steps):
            if begin is not None:
                begin(step)
            for i, layer in enumerate(layers):
                start = time.perf_counter()
                x = layer_forward(x, layer, block_index)
                x = x / x.norm()
                times[i].append(time.perf_counter() - start)
            if end is not None:
                end(step)
    return times


def child(args: argparse.Namespace) -> None:
    """One process: all the layers (role "one") or half of them, taking turns through two FIFOs (roles A, B)."""
    import torch

    torch.set_num_threads(args.threads)
    count = args.layers if args.role == "one" else args.layers // 2
    layers = build_layers(count, seed={"one": 0, "A": 0, "B": 1}[args.role], batch=args.batch,
                          blocks_per_seq=args.context // BLOCK)
    begin = end = None
    if args.role != "one":
        # turns A0 B0 A1 B1 ... : A waits for B's turn before each step but its first, B for A's before each of
        # its steps; each hands the turn on after its step, but for B's last (A has finished by then)
        to_b, to_a = Path(args.fifo_dir) / "to_b", Path(args.fifo_dir) / "to_a"
        if args.role == "A":
            out, inp = os.open(to_b, os.O_WRONLY), os.open(to_a, os.O_RDONLY)
        else:
            inp, out = os.open(to_b, os.O_RDONLY), os.open(to_a, os.O_WRONLY)
        first_wait = 1 if args.role == "A" else 0
        last_pass = args.steps - (2 if args.role == "B" else 1)
        from hexgen.engine.turns import release_worker_threads

        def begin(step: int) -> None:
            if step >= first_wait:
                os.read(inp, 1)

        def end(step: int) -> None:
            if not args.keep_threads and not args.release_after:
                release_worker_threads()
            if step <= last_pass:
                os.write(out, b"t")
            if not args.keep_threads and args.release_after:
                release_worker_threads()

    times = run_layers(layers, args.steps, args.batch, args.context // BLOCK, begin, end)
    warm = args.steps // 5  # the first steps warm up allocator and caches
    print(" ".join(f"{statistics.median(t[warm:]) * 1e3:.3f}" for t in times), flush=True)


def spawn(role: str, args: argparse.Namespace, fifo_dir: str, spin_count: int) -> subprocess.Popen:
    env = dict(os.environ, GOMP_SPINCOUNT=str(spin_count))  # read once when libgomp loads: set before it starts
    command = [sys.executable, __file__, "--role", role, "--fifo-dir", fifo_dir, "--steps", str(args.steps),
               "--layers", str(args.layers), "--batch", str(args.batch), "--context", str(args.context),
               "--threads", str(args.threads)] + (["--keep-threads"] if args.keep_threads else []) \
        + (["--release-after"] if args.release_after else [])
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def collect(process: subprocess.Popen) -> list[float]:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"a benchmark process failed (exit code {process.returncode})")
    return [float(v) for v in out.split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="decode steps timed per process")
    parser.add_argument("--layers", type=int, default=30, help="layers of the whole model (even: half per turn)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--context", type=int, default=160, help=f"cached tokens per sequence (a multiple of {BLOCK})")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of each process")
    parser.add_argument("--rounds", type=int, default=2, help="one process, then the pair, this many times")
    parser.add_argument("--pair-spin-count", type=int, help="GOMP_SPINCOUNT of the pair (default: what hexgen gives "
                        "stages taking turns, a lone rank's, launch/spec.py:ALONE_SPIN_COUNT, as the one process gets; "
                        "with --keep-threads: what it gives ranks sharing cores at once, SHARED_SPIN_COUNT)")
    parser.add_argument("--keep-threads", action="store_true", help="the pair keeps its OpenMP worker threads "
                        "between turns (hexgen's stages before 2026-12-01 14:00 UTC)")
    parser.add_argument("--release-after", action="store_true", help="release the worker threads after handing the "
                        "turn on, as hexgen's stages do (engine/turns.py says why), not before")
    parser.add_argument("--role", choices=["one", "A", "B"], help=argparse.SUPPRESS)
    parser.add_argument("--fifo-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return 0
    for name in ("steps", "layers", "batch", "context", "threads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.layers % 2 or args.context % BLOCK or args.steps < 5:
        parser.error(f"--layers must be even, --context a multiple of {BLOCK}, --steps at least 5")

    from hexgen.launch.spec import ALONE_SPIN_COUNT, SHARED_SPIN_COUNT
    from hexgen.machine import cpu_description

    half = args.layers // 2
    pair_spin = args.pair_spin_count
    if pair_spin is None:
        pair_spin = SHARED_SPIN_COUNT if args.keep_threads else ALONE_SPIN_COUNT
    rows = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="hexgen-turns-") as fifo_dir:
            one = collect(spawn("one", args, fifo_dir, ALONE_SPIN_COUNT))
            for name in ("to_a", "to_b"):
                os.mkfifo(Path(fifo_dir) / name)
            pair = [spawn(role, args, fifo_dir, pair_spin) for role in ("A", "B")]
            a, b = (collect(p) for p in pair)
        rows.append((one, a, b))
    print(f"Machine: {cpu_description()}; {args.threads} torch threads per process; batch {args.batch}, "
          f"{args.context} cached tokens each; OpenMP spin count {ALONE_SPIN_COUNT} alone, {pair_spin} in the pair, "
          f"which {'keeps' if args.keep_threads else 'releases'} its worker threads between turns"
          f"{' (after handing the turn on)' if args.release_after and not args.keep_threads else ''}; "
          f"median per layer over {args.steps - args.steps // 5} steps (ms)\n")
    print("| layer of a turn | one process (its layers i and i + half, mean) | A (turn 1) | B (turn 2) |")
    print("|---|---|---|---|")
    for i in range(half):
        one_ms = statistics.mean(statistics.mean((r[0][i], r[0][i + half])) for r in rows)
        print(f"| {i + 1} | {one_ms:.2f} | {statistics.mean(r[1][i] for r in rows):.2f} | "
              f"{statistics.mean(r[2][i] for r in rows):.2f} |")
    for k, (one, a, b) in enumerate(rows, 1):
        print(f"\nround {k}: one process {sum(one):.1f} ms a step, two taking turns {sum(a) + sum(b):.1f} "
              f"({(sum(a) + sum(b)) / sum(one) - 1:+.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
