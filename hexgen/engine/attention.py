"""Attention over the paged KV pool for a whole step: one key/value write and one attention call per layer.

A step packs the new tokens of B sequences (prefill chunks and decodes mixed) into one flat batch [T, ...].
`StepMetadata` is built once per step from the plan and shared by every layer. On CUDA with Triton the
paged-attention kernel reads keys through the block tables (a pool of slots, each its key and value heads).
Elsewhere the pool keeps each block head by head, and one gather through the block tables lays a group's keys
and values out as [B, kv_heads, K, d], the layout a batched matmul reads: decodes attend with two of them (each KV
head's query heads as rows of that head; one SDPA call where they are few over short contexts), prefill chunks
with one SDPA call under a causal/length mask; a step mixing decodes and prefill chunks attends each kind apart, so
the decodes' queries are not padded to the chunks' length. Where the machine's C compiler builds it, a CPU kernel
of our own reads the pool in place through the block tables instead (`cpu_attention.py`): the whole step in one
call, decodes and prefill chunks alike. The op count of a step does not depend on B: there is no per-sequence loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hexgen.engine.cpu_attention import AttentionKernel, split_tasks
from hexgen.engine.host_copy import tensor_to_device, to_device
from hexgen.engine.messages import StepPlan

# A step's decodes attend by two batched matmuls once they have this many keys in all (sequences x gathered keys),
# else by one SDPA call. SmolLM2 on the 2-core Zen 4 EPYC (2026-12-02), decode steps in one process alternating
# the two: in bf16 the matmuls took 0.76x SDPA's step time at 16 sequences over 1,040-token contexts, 0.87x at 64
# over 256 and 0.95x at 16 over 144, but 1.09x at one sequence over 144 keys (oneDNN's fixed cost of a small bf16
# matmul: 60 µs a layer where SDPA took 44); in fp32 within 4% of each other throughout.
MATMUL_DECODE_MIN_KEYS = 1024


@dataclass(frozen=True)
class GatherGroup:
    """Sequences that the gather path attends in one SDPA call: a step's decodes, or its prefill chunks.

    Keys are gathered through the block tables, whole blocks at a time, into [b, K] (K = max_blocks * block_size);
    queries of chunks are padded to [b, Q]. Decodes and
    chunks go in separate groups so that a step mixing 15 decodes with one 35-token chunk pads 15 + 35 queries,
    not 16 x 35 (measured on the 2-core EPYC, SmolLM2-135M: such a step's attention 33 -> 13 ms).
    """

    rows: torch.Tensor | None  # [n] int64: the group's rows in the step's flat batch; None: all of them, in order
    # [2 * b * kv_heads * max_blocks] int64: the pool rows (a block's key or value head) to gather, in the order
    # (keys then values, sequence, head, block): the gathered rows are [2, b, kv_heads, K, d]; tables padded
    # with block 0. None where the decode kernel reads the pool instead
    kv_rows: torch.Tensor | None
    # additive: 0 where a (padded) query sees a key, else -inf; decodes [b * kv_heads, 1, K] (one row a KV head),
    # chunks [b, 1, Q, K]. None for chunks that each begin their
    # prompt (nothing cached before them): the first Q keys are theirs and SDPA's own causal mask applies, which
    # skips the hidden key tiles (a 1,536-token prompt's attention, SmolLM2 shape, 2-core Xeon: 22.7 -> 14.1 ms a
    # layer in fp32, 9.8 -> 5.7 in bf16; the same numbers out). A chunk after cached keys keeps the tensor mask:
    # torch's causal_lower_right bias, which would spare building it, ran slower in SDPA (one sequence, SmolLM2
    # heads, 2-core Xeon, 2026-12-01: 512 new of 1,536 keys 9.1 ms with the mask against 9.9, bf16 3.3 against 3.9;
    # building the mask once a step for 30 layers: 0.5-0.8 ms).
    mask: torch.Tensor | None
    query_index: torch.Tensor | None  # [n] int64: each token's row in the padded [b * Q] queries; None when Q == 1
    num_seqs: int
    max_query_len: int


@dataclass(frozen=True)
class KernelGroup:
    """A step's sequences, all of them, which the CPU attention kernel attends in one call, reading the pool in
    place (`cpu_attention.py`)."""

    kernel: AttentionKernel
    block_tables: torch.Tensor  # [b, max_blocks] int64, padded with block 0, on the host
    tasks: torch.Tensor  # [t, 4] int64 on the host: cpu_attention.Task rows over the group's packed tokens


@dataclass(frozen=True)
class LayerPool:
    """One layer's part of the paged pool, [blocks, block_size * 2 kv_heads * d], in one of two layouts fixed at
    allocation, with views made once then (on CPU each view made inside a decode step costs about as much as a
    small kernel).

    Slot-major, the Triton kernels': a slot (block * block_size + offset) holds its key heads, then its value
    heads; `paged` gives keys and values as strided views [blocks, block_size, kv_heads, d].

    Head-major, the gather path's: a block holds its key heads, then its value heads, each [block_size, d]. One
    index_select of whole heads lays a group's keys and values out as [2, b, kv_heads, K, d], which batched
    matmuls read as they are. Gathering slot-major blocks gave [b, K, kv_heads, d], which SDPA's CPU kernel read
    as strided views: a bf16 decode layer at batch 16 over 1,040-token contexts (SmolLM2 heads, 2-core Zen 4
    EPYC, alone, alternating) took 6.5 ms that way against 3.5 ms now.
    """

    kv_heads: int
    head_dim: int
    block_size: int
    head_major: bool
    rows: torch.Tensor  # head-major: [blocks * 2 kv_heads, block_size * d], a block's head a row (what is gathered)
    # slot-major: [slots, 2 kv_heads, d]; head-major: [blocks * 2 kv_heads * block_size, d], a token's head a row
    # (what is written)
    entries: torch.Tensor

    @staticmethod
    def of(pool: torch.Tensor, block_size: int, kv_heads: int, head_dim: int, head_major: bool) -> LayerPool:
        """Views of a layer's pool [blocks, block_size * 2 kv_heads * head_dim]."""
        if head_major:
            return LayerPool(kv_heads, head_dim, block_size, True, pool.view(-1, block_size * head_dim),
                             pool.view(-1, head_dim))
        return LayerPool(kv_heads, head_dim, block_size, False, pool, pool.view(-1, 2 * kv_heads, head_dim))

    def paged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a slot-major pool as strided views [blocks, block_size, kv_heads, d] (the Triton
        kernels' layout)."""
        assert not self.head_major, "the Triton kernels read slot-major pools"
        shape = (-1, self.block_size, self.kv_heads, self.head_dim)
        return self.entries[:, : self.kv_heads].view(shape), self.entries[:, self.kv_heads :].view(shape)


@dataclass(frozen=True)
class StepMetadata:
    positions: torch.Tensor  # [T] int64: position of every new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64: flat pool slot (block * block_size + offset) of every new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with block 0
    query_start: torch.Tensor  # [B+1] int32: cumulative new tokens
    context_lens: torch.Tensor  # [B] int32: cached tokens after this step's writes
    last_token_index: torch.Tensor  # [B] int64: each sequence's last new token in the flat batch
    max_query_len: int
    max_position: int  # the step's largest position (known on the host: no device sync to size RoPE tables)
    block_size: int
    # CPU (no Triton): the kernel's one group, or the gather path's one group, or its decodes and chunks apart
    groups: tuple[GatherGroup | KernelGroup, ...] = ()
    # gather path only: [T * 2 kv_heads] int64, the row of a head-major pool's `entries` each new token's key and
    # value heads go to (token by token, its key heads, then its value heads)
    kv_write_rows: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]


def build_metadata(
    plan: StepPlan, block_size: int, device: torch.device, use_kernel: bool, kv_heads: int,
    dtype: torch.dtype = torch.float32, attention_kernel: AttentionKernel | None = None,
) -> StepMetadata:
    """Everything the layers need about a step's layout, built with a fixed number of tensor ops per group;
    `kv_heads`: the rank's KV heads (the gather path's indices into its head-major pool); `attention_kernel`: the
    CPU kernel that attends the step (None: the gather path)."""
    positions = [s + i for s, n in zip(plan.starts, plan.lengths, strict=True) for i in range(n)]
    seq_of_token = [b for b, n in enumerate(plan.lengths) for _ in range(n)]
    slots = [plan.block_tables[b][p // block_size] * block_size + p % block_size
             for b, p in zip(seq_of_token, positions, strict=True)]
    max_blocks = max(len(t) for t in plan.block_tables)
    tables = [t + [0] * (max_blocks - len(t)) for t in plan.block_tables]
    starts = plan.token_starts()
    context = [s + n for s, n in zip(plan.starts, plan.lengths, strict=True)]
    groups: tuple[GatherGroup | KernelGroup, ...] = ()
    kv_write_rows = None
    if not use_kernel:  # no Triton: the step's groups, and where its keys and values go in a head-major pool
        if attention_kernel is not None:  # the whole step in one call; block tables and tasks on the host
            assert device.type == "cpu", "the CPU attention kernel reads a pool in host memory"
            groups = (KernelGroup(attention_kernel, torch.tensor(tables, dtype=torch.int64),
                                  split_tasks(plan.lengths, plan.starts, attention_kernel.tile_tokens)),)
        else:  # the gather path: decodes and chunks apart
            members = [m for m in ([b for b, n in enumerate(plan.lengths) if n == 1],
                                   [b for b, n in enumerate(plan.lengths) if n > 1]) if m]
            groups = tuple(_gather_group(plan, m, starts, block_size, kv_heads, dtype, device, len(members) == 1)
                           for m in members)
        slot = torch.tensor(slots, dtype=torch.int64).unsqueeze(1)  # [T, 1]
        head_rows = (slot // block_size * (2 * kv_heads) + torch.arange(2 * kv_heads)) * block_size
        kv_write_rows = tensor_to_device((head_rows + slot % block_size).view(-1), device)
    return StepMetadata(
        positions=to_device(positions, device, torch.int64),
        slot_mapping=to_device(slots, device, torch.int64),
        block_tables=to_device(tables, device, torch.int32),
        query_start=to_device(starts, device, torch.int32),
        context_lens=to_device(context, device, torch.int32),
        last_token_index=to_device([s - 1 for s in starts[1:]], device, torch.int64),  # built on the host: no kernel
        max_query_len=max(plan.lengths),
        max_position=max(positions),
        block_size=block_size,
        groups=groups,
        kv_write_rows=kv_write_rows,
    )


def _rows(plan: StepPlan, members: list[int], token_starts: list[int]) -> torch.Tensor:
    """The flat batch rows of the plan's sequences `members`, in order."""
    return torch.tensor([token_starts[b] + i for b in members for i in range(plan.lengths[b])])


def _padded_tables(plan: StepPlan, members: list[int]) -> torch.Tensor:
    """The block tables of `members`, [b, max_blocks] int64, padded with block 0."""
    max_blocks = max(len(plan.block_tables[b]) for b in members)
    return torch.tensor([plan.block_tables[b] + [0] * (max_blocks - len(plan.block_tables[b])) for b in members],
                        dtype=torch.int64)


def _gather_group(
    plan: StepPlan, members: list[int], token_starts: list[int], block_size: int, kv_heads: int,
    dtype: torch.dtype, device: torch.device, whole: bool,
) -> GatherGroup:
    """The gather layout of the plan's sequences `members` (indices into the plan, in plan order)."""
    lengths = [plan.lengths[b] for b in members]
    q_max = max(lengths)
    block_tables = _padded_tables(plan, members)
    rows = None if whole else _rows(plan, members, token_starts)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    context = torch.tensor([plan.starts[b] for b in members], dtype=torch.int64) + lengths_t
    mask = None
    if q_max == 1 or any(plan.starts[b] for b in members):
        allowed = _gather_mask(block_tables.shape[1] * block_size, context, lengths_t, q_max)
        # An additive mask: SDPA's CPU kernel runs up to twice as fast with it as with a boolean one.
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        if q_max == 1:  # decodes: [b * kv_heads, 1, K], the row that each KV head's query rows add
            mask = mask.expand(-1, kv_heads, -1, -1).reshape(-1, 1, mask.shape[-1])
    query_index = None
    if q_max > 1:
        query_index = torch.tensor([g * q_max + i for g, n in enumerate(lengths) for i in range(n)])
    heads = torch.arange(2 * kv_heads).view(2, 1, kv_heads, 1)  # keys' heads, then values'
    kv_rows = (block_tables.unsqueeze(0).unsqueeze(2) * (2 * kv_heads) + heads).view(-1)  # [2, b, kv_heads, blocks]

    def to(t: torch.Tensor) -> torch.Tensor:
        return tensor_to_device(t, device)

    return GatherGroup(rows=None if rows is None else to(rows), kv_rows=to(kv_rows),
                       mask=None if mask is None else to(mask),
                       query_index=None if query_index is None else to(query_index), num_seqs=len(members),
                       max_query_len=q_max)


def _gather_mask(keys: int, context: torch.Tensor, lengths: torch.Tensor, q_max: int) -> torch.Tensor:
    """The boolean mask [B, 1, Q, K] of the gather path: which of its `keys` gathered positions each (padded)
    query sees."""
    key_pos = torch.arange(keys)  # [K]
    q_row = torch.arange(q_max)  # [Q]
    query_pos = (context - lengths).unsqueeze(1) + q_row  # [B, Q]
    mask = key_pos.view(1, 1, -1) <= query_pos.unsqueeze(-1)  # causal, and never past the context
    padded = q_row.unsqueeze(0) >= lengths.unsqueeze(1)  # [B, Q] rows with no token: see key 0 only (no NaN)
    mask = mask & ~padded.unsqueeze(-1) | (padded.unsqueeze(-1) & (key_pos == 0))
    return mask.unsqueeze(1)


def write_kv(pool: LayerPool, kv: torch.Tensor, meta: StepMetadata) -> None:
    """Store the step's keys and values, kv [T, 2 kv_heads, d] (each token's key heads, then its value heads), in
    their slots."""
    if pool.head_major:
        assert meta.kv_write_rows is not None
        pool.entries.index_copy_(0, meta.kv_write_rows, kv.reshape(-1, pool.head_dim))
    else:
        pool.entries.index_copy_(0, meta.slot_mapping, kv)


def paged_attention(q: torch.Tensor, pool: LayerPool, meta: StepMetadata, scale: float) -> torch.Tensor:
    """Causal attention of the step's queries q [T, h, d] over their sequences' cached keys -> [T, h, d]."""
    if not meta.groups:
        from hexgen.engine import kernels  # Triton: only on CUDA, only when installed

        # decode steps of few sequences over long contexts split each sequence's keys over several programs
        splits = 1 if meta.max_query_len > 1 else kernels.choose_kv_splits(
            meta.num_seqs, pool.kv_heads, meta.max_position + 1, q.device)
        return kernels.paged_attention(
            q, *pool.paged(), meta.block_tables, meta.query_start, meta.context_lens,
            meta.max_query_len, scale, splits,
        )
    if len(meta.groups) == 1:
        return _attend_group(q, pool, meta.groups[0], scale)
    out = torch.empty_like(q)
    for group in meta.groups:  # the gather path's decodes, then its prefill chunks: two calls whatever the batch size
        assert isinstance(group, GatherGroup) and group.rows is not None
        out.index_copy_(0, group.rows, _attend_group(q.index_select(0, group.rows), pool, group, scale))
    return out


def _attend_group(q: torch.Tensor, pool: LayerPool, group: GatherGroup | KernelGroup, scale: float) -> torch.Tensor:
    """One group: q [n, h, d] -> [n, h, d]."""
    kv_heads = pool.kv_heads
    if isinstance(group, KernelGroup):  # the pool read in place (cpu_attention.py)
        return group.kernel(q, pool.rows, group.block_tables, group.tasks, kv_heads, pool.block_size, scale)
    batch, q_max = group.num_seqs, group.max_query_len
    heads, head_dim = q.shape[1:]
    assert group.kv_rows is not None
    # one index_select of whole heads of blocks (an order of magnitude faster on CPU than advanced indexing)
    kv = pool.rows.index_select(0, group.kv_rows).view(2, batch, kv_heads, -1, head_dim)  # [2, b, kv, K, d]
    if group.query_index is None:  # every sequence brings one token
        # each KV head's query heads (heads i*g .. i*g+g-1 share KV head i) attend as g query rows of that head:
        # no GQA expansion, and the output [b * kv, g, d] is already [b, h, d]
        assert group.mask is not None
        if group.num_seqs * kv.shape[3] < MATMUL_DECODE_MIN_KEYS:
            out = F.scaled_dot_product_attention(
                q.view(batch, kv_heads, heads // kv_heads, head_dim), kv[0], kv[1],
                attn_mask=group.mask.view(batch, kv_heads, 1, -1), scale=scale)  # [b, kv, g, d]
            return out.reshape(batch, heads, head_dim)
        # two batched matmuls with the softmax between in fp32 (as HF's eager attention)
        keys, values = kv.view(2, batch * kv_heads, -1, head_dim)
        scores = torch.baddbmm(group.mask, q.reshape(batch * kv_heads, heads // kv_heads, head_dim),
                               keys.transpose(1, 2), alpha=scale)  # [b * kv, g, K]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs, values).view(batch, heads, head_dim)
    keys, values = kv  # [b, kv, K, d] each
    query = q.new_zeros(batch * q_max, heads, head_dim).index_copy_(0, group.query_index, q)
    query = query.view(batch, q_max, heads, head_dim)
    if group.mask is None:  # chunks that begin their prompts: query i sees keys 0..i, all its own (a padded row
        keys, values = keys[:, :, :q_max], values[:, :, :q_max]  # past a chunk's end sees what it likes; dropped)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), keys, values,
        attn_mask=group.mask, is_causal=group.mask is None, scale=scale, enable_gqa=True,
    )  # [B, h, Q, d]
    out = out.transpose(1, 2).reshape(batch * q_max, heads, head_dim)
    return out.index_select(0, group.query_index)
