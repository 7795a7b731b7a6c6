"""How many KV blocks a rank's memory holds (no torch): weights of a rank, bytes per block, the budget check.

Checked in the parent before any process starts, so a budget that cannot hold a rank's weights plus one
block per running sequence is a one-line error, not a crash in a rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from hexgen.engine.block_manager import blocks_for
from hexgen.errors import UserError
from hexgen.models import ModelSpec

GIB = 1 << 30
CPU_DEFAULT_KV_BYTES = 2 * GIB  # the most a CPU rank takes for KV blocks unless --memory-gb says otherwise
CUDA_MARGIN_FRACTION = 0.10  # of the GPU's memory kept free for activations and the allocator


@dataclass(frozen=True)
class RankShape:
    """What one rank holds: its stage's layer count and TP degree, and whether it has the embedding / head."""

    num_layers: int
    tp_degree: int
    is_first: bool
    is_last: bool


def rank_weight_bytes(spec: ModelSpec, rank: RankShape, dtype_bytes: int, cpu_packed: bool = False) -> int:
    """Bytes of the weights one rank holds (TP shards; vocabulary rows padded to equal shards). With cpu_packed (a
    CPU rank in fp32, or in bf16 where the CPU has bf16 arithmetic) its linear layers and LM head are held in
    oneDNN's layout instead, the same size, except that a head tied to the embedding on the same rank keeps the
    dense table for the embedding: one more copy of it."""
    h, tp = spec.hidden_size, rank.tp_degree
    q_size = spec.num_heads * spec.head_dim
    linears = (h * (q_size + 2 * spec.kv_dim) + q_size * h + 3 * h * spec.intermediate_size) // tp
    vocab_rows = -(-spec.vocab_size // tp)
    total = rank.num_layers * (linears + 2 * h)
    if rank.is_first:
        total += vocab_rows * h
    if rank.is_last:
        total += h + (0 if spec.tie_word_embeddings and rank.is_first else vocab_rows * h)
    if cpu_packed and rank.is_first and rank.is_last and spec.tie_word_embeddings:
        total += vocab_rows * h
    return total * dtype_bytes


def kv_bytes_per_block(spec: ModelSpec, rank: RankShape, block_size: int, dtype_bytes: int) -> int:
    """Keys and values of `block_size` tokens over the rank's layers and its share of the KV heads."""
    return rank.num_layers * 2 * block_size * (spec.num_kv_heads // rank.tp_degree) * spec.head_dim * dtype_bytes


def blocks_wanted(max_running_seqs: int, max_context: int, block_size: int) -> int:
    """Blocks for every sequence at full context: more would never be used."""
    return max_running_seqs * blocks_for(max_context, block_size)


def check_memory_budget(
    spec: ModelSpec, ranks: list[RankShape], memory_bytes: int, max_running_seqs: int, block_size: int,
    dtype_bytes: int, cpu_packed: bool = False,
) -> None:
    """Raise a UserError naming --memory-gb when some rank cannot hold its weights and one block per sequence."""
    need = max(
        rank_weight_bytes(spec, r, dtype_bytes, cpu_packed)
        + max_running_seqs * kv_bytes_per_block(spec, r, block_size, dtype_bytes)
        for r in ranks
    )
    if memory_bytes < need:
        raise UserError(
            f"--memory-gb {memory_bytes / GIB:.3g} cannot hold a rank's weights plus one KV block for each of "
            f"--max-batch {max_running_seqs} sequences: it must be at least {need / GIB:.3g} GiB"
        )
