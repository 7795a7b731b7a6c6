"""CUDA graphs of one stage's layers for decode steps (one new token per sequence), one per batch-size bucket.

A decode step of a small model is bound by kernel launches, not by the GPU: replaying a captured graph issues
all of a stage's kernels at once. Inputs live in static buffers the graphs were captured on; a step copies its
metadata in (padding rows write no KV: slot -1) and replays the smallest bucket that holds its batch. The
embedding, the stage-to-stage transfers, the logits and sampling stay outside the graph. Needs the Triton
kernels (the torch attention path sizes tensors by the batch's contents).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from hexgen.engine.attention import StepMetadata
from hexgen.engine.block_manager import blocks_for
from hexgen.engine.host_copy import copy_into
from hexgen.engine.messages import StepPlan
from hexgen.engine.stage import LlamaStage

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, stage: LlamaStage, max_batch: int, max_context: int, block_size: int):
        device = stage.device
        self.stage = stage
        self.block_size = block_size
        self.max_context = max_context
        self.max_blocks = blocks_for(max_context, block_size)
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        width = self.buckets[-1]
        self.hidden = torch.zeros(width, stage.spec.hidden_size, dtype=stage.dtype, device=device)
        self.positions = torch.zeros(width, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((width,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(width, self.max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(width, dtype=torch.int32, device=device)
        self.query_start = torch.arange(width + 1, dtype=torch.int32, device=device)
        stage.rope.reserve(max_context)  # the tables must not move once graphs point at them
        self._pool = None  # the graphs' shared memory pool, once the first is captured
        self.replays: dict[int, Callable[[], None]] = {}  # bucket -> replay of its graph
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> the static output [bucket, H] its replay fills
        self._capture(device)

    def _meta(self, batch: int) -> StepMetadata:
        return StepMetadata(
            positions=self.positions[:batch], slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch], query_start=self.query_start[: batch + 1],
            context_lens=self.context_lens[:batch], last_token_index=self.positions[:batch],
            max_query_len=1, max_position=self.max_context - 1, block_size=self.block_size,
        )

    @torch.inference_mode()
    def _capture(self, device: torch.device) -> None:
        for batch in reversed(self.buckets):  # largest first: smaller graphs reuse its memory pool
            meta = self._meta(batch)
            self.stage.forward_layers(self.hidden[:batch], meta)  # warm-up: kernel compilation, NCCL set-up
            self.replays[batch], self.outputs[batch] = self._record(
                lambda batch=batch, meta=meta: self.stage.forward_layers(self.hidden[:batch], meta), device
            )

    def _record(self, run: Callable[[], torch.Tensor], device: torch.device) -> tuple[Callable[[], None], torch.Tensor]:
        """Capture `run` (the layers over the static buffers) into a graph: (its replay, its static output). All
        graphs share one memory pool, the first (largest) graph's."""
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = run()
        self._pool = graph.pool()
        return graph.replay, output  # the bound replay keeps the graph alive

    def can_run(self, plan: StepPlan) -> bool:
        return (plan.is_decode_only and plan.num_seqs <= self.buckets[-1]
                and max(len(t) for t in plan.block_tables) <= self.max_blocks)

    def run(self, plan: StepPlan, hidden: torch.Tensor) -> torch.Tensor:
        """The stage's output [B, H] for a decode step whose input activations are hidden [B, H]."""
        n = plan.num_seqs
        batch = self.buckets[bisect.bisect_left(self.buckets, n)]
        pad = batch - n
        positions = plan.starts + [0] * pad
        slots = [t[p // self.block_size] * self.block_size + p % self.block_size
                 for t, p in zip(plan.block_tables, plan.starts, strict=True)] + [-1] * pad
        # Only the columns the batch's longest table fills: the kernel reads a row's entries below its context
        # (padding rows have context 0), never what is left past them from earlier steps. Padding all 64 rows to
        # a 4,096-token context's 256 columns took 1.2 ms of host time per step, 12 would take 0.08 (2-core EPYC).
        width = max(len(t) for t in plan.block_tables)
        tables = [t + [0] * (width - len(t)) for t in plan.block_tables]
        self.hidden[:n].copy_(hidden)
        copy_into(self.positions[:batch], positions)
        copy_into(self.slot_mapping[:batch], slots)
        copy_into(self.context_lens[:batch], [p + 1 for p in plan.starts] + [0] * pad)
        copy_into(self.block_tables[:n, :width], tables)
        self.replays[batch]()
        # A copy, not a view of the static output: the next replay overwrites that, and on a pipeline the send of
        # this step's activations to the next stage (asynchronous, on NCCL's stream) may still be reading it.
        return self.outputs[batch][:n].clone()
