"""Attention over the paged KV pool for a whole step: one key/value write and one attention call per layer.

A step packs the new tokens of B sequences (prefill chunks and decodes mixed) into one flat batch [T, ...].
`StepMetadata` is built once per step from the plan and shared by every layer. On CUDA with Triton the
paged-attention kernel reads keys through the block tables; elsewhere keys are gathered through the block
tables into [B, K] and one SDPA call with a causal/length mask serves the batch (decode-only steps skip the
query padding; a step mixing decodes and prefill chunks makes one call for each kind, so the decodes' queries
are not padded to the chunks' length). The op count of a step does not depend on B: there is no per-sequence
loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hexgen.engine.host_copy import tensor_to_device, to_device
from hexgen.engine.messages import StepPlan


@dataclass(frozen=True)
class GatherGroup:
    """Sequences that the gather path attends in one SDPA call: a step's decodes, or its prefill chunks.

    Keys are gathered through the block tables, whole blocks at a time, into [b, K] (K = max_blocks * block_size);
    queries of chunks are padded to [b, Q]. Decodes and
    chunks go in separate groups so that a step mixing 15 decodes with one 35-token chunk pads 15 + 35 queries,
    not 16 x 35 (measured on the 2-core EPYC, SmolLM2-135M: such a step's attention 33 -> 13 ms).
    """

    rows: torch.Tensor | None  # [n] int64: the group's rows in the step's flat batch; None: all of them, in order
    block_index: torch.Tensor  # [b * max_blocks] int64: every sequence's block table, padded with block 0
    # [b, 1, Q, K] additive: 0 where a (padded) query sees a key, else -inf. None for chunks that each begin their
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
class LayerPool:
    """One layer's part of the paged pool, [slots, 2 kv_heads, d] (slot = block * block_size + offset; a slot's
    key heads, then its value heads), as views made once at allocation: on CPU each view made inside a decode step
    costs about as much as a small kernel. Keys and values of a slot side by side let one index_copy_ store a step's
    k and v (adjacent in the qkv projection's output) and one index_select gather both: on the 2-core EPYC, alone,
    the gather and SDPA of a decode layer take 58 µs instead of 67 at batch 1 and 368 instead of 416 at batch 16;
    inside a decode step (SmolLM2, 128-token prompts) RoPE, KV write and attention 18.0 -> 17.8 ms at batch 16.
    The gather path copies whole blocks (one row of `blocks` each), not slot by slot: SmolLM2 on the 2-core EPYC,
    a decode step at batch 16 75.7-76.7 -> 72.1-76.1 ms, at batch 1 33.7-36.4 -> 33.6-34.6 (three runs each way,
    alternating), and the step's gather index is its block tables as they are. The Triton kernels take keys and
    values as strided views (`paged`)."""

    entries: torch.Tensor  # [slots, 2 kv_heads, d]
    blocks: torch.Tensor  # the same memory as [blocks, block_size * 2 kv_heads * d] (the gather path's rows)

    @staticmethod
    def of(pool: torch.Tensor, block_size: int) -> LayerPool:
        """Views of a layer's pool [slots, 2, kv_heads, d] (keys, then values, of each slot)."""
        return LayerPool(pool.flatten(1, 2), pool.view(pool.shape[0] // block_size, -1))

    @property
    def kv_heads(self) -> int:
        return self.entries.shape[1] // 2

    def paged(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as strided views [blocks, block_size, kv_heads, d] (the Triton kernels' layout)."""
        slots, _, head_dim = self.entries.shape
        shape = (slots // block_size, block_size, self.kv_heads, head_dim)
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
    groups: tuple[GatherGroup, ...] = ()  # gather path only: one group, or decodes and chunks apart

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]


def build_metadata(
    plan: StepPlan, block_size: int, device: torch.device, use_kernel: bool, dtype: torch.dtype = torch.float32
) -> StepMetadata:
    """Everything the layers need about a step's layout, built with a fixed number of tensor ops per group."""
    positions = [s + i for s, n in zip(plan.starts, plan.lengths, strict=True) for i in range(n)]
    seq_of_token = [b for b, n in enumerate(plan.lengths) for _ in range(n)]
    slots = [plan.block_tables[b][p // block_size] * block_size + p % block_size
             for b, p in zip(seq_of_token, positions, strict=True)]
    max_blocks = max(len(t) for t in plan.block_tables)
    tables = [t + [0] * (max_blocks - len(t)) for t in plan.block_tables]
    starts = plan.token_starts()
    context = [s + n for s, n in zip(plan.starts, plan.lengths, strict=True)]
    groups: tuple[GatherGroup, ...] = ()
    if not use_kernel:
        decodes = [b for b, n in enumerate(plan.lengths) if n == 1]
        chunks = [b for b, n in enumerate(plan.lengths) if n > 1]
        members = [m for m in (decodes, chunks) if m]
        groups = tuple(
            _gather_group(plan, m, starts, block_size, dtype, device, whole=len(members) == 1) for m in members
        )
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
    )


def _gather_group(
    plan: StepPlan, members: list[int], token_starts: list[int], block_size: int, dtype: torch.dtype,
    device: torch.device, whole: bool,
) -> GatherGroup:
    """The gather layout of the plan's sequences `members` (indices into the plan, in plan order)."""
    lengths = [plan.lengths[b] for b in members]
    q_max = max(lengths)
    max_blocks = max(len(plan.block_tables[b]) for b in members)
    block_tables = torch.tensor([plan.block_tables[b] + [0] * (max_blocks - len(plan.block_tables[b]))
                                 for b in members], dtype=torch.int64)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    context = torch.tensor([plan.starts[b] for b in members], dtype=torch.int64) + lengths_t
    mask = None
    if q_max == 1 or any(plan.starts[b] for b in members):
        allowed = _gather_mask(block_tables.shape[1] * block_size, context, lengths_t, q_max)
        # An additive mask: SDPA's CPU kernel runs up to twice as fast with it as with a boolean one.
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    query_index = None
    if q_max > 1:
        query_index = torch.tensor([g * q_max + i for g, n in enumerate(lengths) for i in range(n)])
    rows = None if whole else torch.tensor([token_starts[b] + i for b in members for i in range(plan.lengths[b])])

    def to(t: torch.Tensor) -> torch.Tensor:
        return tensor_to_device(t, device)

    return GatherGroup(rows=None if rows is None else to(rows), block_index=to(block_tables.view(-1)),
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
    pool.entries.index_copy_(0, meta.slot_mapping, kv)


def paged_attention(q: torch.Tensor, pool: LayerPool, meta: StepMetadata, scale: float) -> torch.Tensor:
    """Causal attention of the step's queries q [T, h, d] over their sequences' cached keys -> [T, h, d]."""
    if not meta.groups:
        from hexgen.engine import kernels  # Triton: only on CUDA, only when installed

        # decode steps of few sequences over long contexts split each sequence's keys over several programs
        splits = 1 if meta.max_query_len > 1 else kernels.choose_kv_splits(
            meta.num_seqs, pool.kv_heads, meta.max_position + 1, q.device)
        return kernels.paged_attention(
            q, *pool.paged(meta.block_size), meta.block_tables, meta.query_start, meta.context_lens,
            meta.max_query_len, scale, splits,
        )
    if len(meta.groups) == 1:
        return _attend_group(q, pool, meta.groups[0], scale)
    out = torch.empty_like(q)
    for group in meta.groups:  # decodes, then prefill chunks: two calls whatever the batch size
        assert group.rows is not None
        out.index_copy_(0, group.rows, _attend_group(q.index_select(0, group.rows), pool, group, scale))
    return out


def _attend_group(q: torch.Tensor, pool: LayerPool, group: GatherGroup, scale: float) -> torch.Tensor:
    """The gather path for one group: q [n, h, d] -> [n, h, d]."""
    batch, q_max = group.num_seqs, group.max_query_len
    heads, head_dim = q.shape[1:]
    kv_heads = pool.kv_heads
    # one index_select over whole blocks: an order of magnitude faster on CPU than advanced indexing; keys and
    # values are then strided views of the gathered rows
    gathered = pool.blocks.index_select(0, group.block_index).view(batch, -1, 2, kv_heads, head_dim)
    keys, values = gathered[:, :, 0], gathered[:, :, 1]  # [b, K, kv_heads, d] each
    if group.query_index is None:  # every sequence brings one token
        # each KV head's query heads (heads i*g .. i*g+g-1 share KV head i) attend as g query rows of that head:
        # no GQA expansion, and the output [B, kv, g, d] is already [B, h, d] (B=16, SmolLM2: 243 -> 202 µs)
        grouped = q.view(batch, kv_heads, heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(
            grouped, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=group.mask, scale=scale,
        )  # [B, kv, g, d]; the mask [B, 1, 1, K] holds for every row
        return out.reshape(batch, heads, head_dim)
    query = q.new_zeros(batch * q_max, heads, head_dim).index_copy_(0, group.query_index, q)
    query = query.view(batch, q_max, heads, head_dim)
    if group.mask is None:  # chunks that begin their prompts: query i sees keys 0..i, all its own (a padded row
        keys, values = keys[:, :q_max], values[:, :q_max]  # past a chunk's end sees what it likes; it is dropped)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=group.mask, is_causal=group.mask is None, scale=scale, enable_gqa=True,
    )  # [B, h, Q, d]
    out = out.transpose(1, 2).reshape(batch * q_max, heads, head_dim)
    return out.index_select(0, group.query_index)
