"""Tensor-parallel building blocks; each holds only its shard and loads it straight from the checkpoint.

Column-parallel layers split the output features (rows of the weight) across the TP group and need no
communication; row-parallel layers split the input features (columns) and leave partial sums that the
caller all-reduces in its forward, where a reviewer sees it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hexgen.engine.parallel import TPGroup
from hexgen.engine.weights import CheckpointReader


def pack_for_cpu(weight: torch.Tensor, column_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """The weight [out, in] (its columns times column_scale [in], when given) in oneDNN's blocked layout for CPU
    products (fp32; bf16 where the CPU has bf16 arithmetic), or None where that does not apply.

    Measured on the 2-core AVX2 EPYC (SmolLM2 shapes): fp32 1.5x MKL's sgemm for the MLP at 16 rows, 2.3x for the LM
    head. On the 2-core Sapphire Rapids Xeon (AMX), bf16 packed against torch's bf16 F.linear (SmolLM2's four
    projections and LM head, hot weights, a scratch micro-benchmark): 1.5-2.3x at one row, 1.4-2.1x at 16, 1.6-1.7x
    at 128. Once packed, a layer's dense weight is dropped
    (PackableLinear.drop_dense) unless a tied embedding shares it.
    """
    if not packs_for_cpu(weight):
        return None
    dense = weight.detach() if column_scale is None else weight.detach() * column_scale
    return torch.ops.mkldnn._reorder_linear_weight(dense, 16)


def packs_for_cpu(weight: torch.Tensor) -> bool:
    """Whether pack_for_cpu keeps a packed copy of this weight: fp32 on a CPU with oneDNN, bf16 where oneDNN
    multiplies bf16 natively (AVX-512 BF16, AMX, AVX-NE-CONVERT)."""
    if weight.is_cuda or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_packs_bf16())


def cpu_packs_bf16() -> bool:
    """Whether this CPU's oneDNN has bf16 products (torch's own check of the CPU's instructions)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           add: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ add), on the packed copy when there is one (the add then runs in oneDNN's GEMM epilogue:
    16 µs less per call at one row than a separate add, SmolLM2's down projection on the 2-core EPYC)."""
    if packed is not None:
        if add is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, add, packed, None, "add")
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return F.linear(x, weight) if add is None else torch.addmm(add, x, weight.t())


def rms_normed_linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, norm_root: torch.Tensor
) -> torch.Tensor:
    """rmsnorm(x) @ W.T for a packed W' = W * (norm weight * sqrt(n)) (n = x's features, norm_root = sqrt(n * eps)):

        rmsnorm(x) @ W.T = (x / sqrt(|x|^2 / n + eps) * weight) @ W.T = (x / sqrt(|x|^2 + n * eps)) @ W'.T

    three small kernels (vector norm, hypot, divide) instead of F.rms_norm's eight on CPU. Measured on the 2-core
    AVX2 EPYC at one row: 6 µs hot against 16, and 17 µs against 41 right after a weight scan has flushed the
    caches, as it is in a decode step. (Dividing in oneDNN's GEMM epilogue instead takes its reference path for a
    [T, 1] divisor at T > 1: 1,000x slower.) In bf16, W' is rounded to bf16 where HF rounds the normed input
    times the norm weight: the logits stay as close to fp32's as HF's own bf16 model (tests/engine/test_cpu_bf16.py),
    and on the 2-core Sapphire Rapids Xeon a decode step took 22.5 -> 21.4 ms at batch 1, 33.7 -> 31.1 at 16.
    """
    denominator = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), norm_root)  # [T, 1]
    return linear(x / denominator, weight, packed)  # on the packed W' (the dense weight is only linear()'s fallback)


class PackableLinear(nn.Module):
    """A layer whose weight can also be kept in oneDNN's CPU layout (`pack`, once the weight is loaded)."""

    weight: nn.Parameter
    packed: torch.Tensor | None = None
    norm_root: torch.Tensor | None = None  # sqrt(in_features * eps) once an RMSNorm is folded into `packed`

    def pack(self, norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0) -> None:
        """Keep the packed copy (where pack_for_cpu applies). With norm_weight [in], the RMSNorm that precedes this
        layer is folded into the copy: the layer's forward then takes the norm's input (see rms_normed_linear)."""
        if norm_weight is None or not packs_for_cpu(self.weight):
            self.packed = pack_for_cpu(self.weight)
            return
        features = self.weight.shape[1]
        self.packed = pack_for_cpu(self.weight, norm_weight * features**0.5)
        self.norm_root = torch.tensor(features * norm_eps, dtype=self.weight.dtype).sqrt()

    def drop_dense(self) -> None:
        """Free the dense weight once the packed copy serves every product (the packed copy is not a transposed
        view of it but a reordered copy, so keeping both doubles a CPU rank's weights). The parameter stays, on the
        meta device, so its shape and dtype still describe the layer, and any read of its values fails loudly.
        The caller must not drop a weight another module shares (a tied embedding)."""
        if self.packed is not None:
            self.weight = nn.Parameter(torch.empty_like(self.weight, device="meta"), requires_grad=False)

    def folds_norm(self) -> bool:
        """Whether forward applies the preceding RMSNorm itself (it was folded into the packed copy)."""
        return self.norm_root is not None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T, or rmsnorm(x) @ weight.T when the norm is folded in."""
        if self.norm_root is not None:
            assert self.packed is not None
            return rms_normed_linear(x, self.weight, self.packed, self.norm_root)
        return linear(x, self.weight, self.packed)

    def packed_bytes(self) -> int:
        return 0 if self.packed is None else self.packed.numel() * self.packed.element_size()


def shard_range(size: int, tp: TPGroup) -> tuple[int, int]:
    """[start, end) of this rank's equal share of `size` (size must divide evenly)."""
    if size % tp.tp_degree:
        raise ValueError(f"{size} features cannot be split evenly over TP degree {tp.tp_degree}")
    part = size // tp.tp_degree
    return tp.tp_rank * part, (tp.tp_rank + 1) * part


class ColumnParallelLinear(PackableLinear):
    """y_local = x @ W_local.T for several fused projections (e.g. q|k|v or gate|up), each split by rows."""

    def __init__(self, in_features: int, out_parts: list[int], tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.out_parts = out_parts
        self.local_parts = [p // tp.tp_degree for p in out_parts]
        self.weight = nn.Parameter(torch.empty(sum(self.local_parts), in_features, dtype=dtype), requires_grad=False)

    def load(self, reader: CheckpointReader, names: list[str]) -> None:
        shards = []
        for name, full_out in zip(names, self.out_parts, strict=True):
            reader.check_shape(name, (full_out, self.in_features))
            start, end = shard_range(full_out, self.tp)
            shards.append(reader.read(name, rows=(start, end)))
        self.weight.copy_(torch.cat(shards, dim=0))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # [T, in] -> one [T, part // tp_degree] tensor per fused projection
        return list(self.fused(x).split(self.local_parts, dim=-1))

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x)  # [T, in] -> [T, sum(parts) // tp_degree], the parts side by side


class RowParallelLinear(PackableLinear):
    """Partial y = x_local @ W[:, local].T; the caller must all-reduce the result over the TP group."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.out_features = out_features
        local_in = in_features // tp.tp_degree
        self.weight = nn.Parameter(torch.empty(out_features, local_in, dtype=dtype), requires_grad=False)

    def load(self, reader: CheckpointReader, name: str) -> None:
        reader.check_shape(name, (self.out_features, self.in_features))
        self.weight.copy_(reader.read(name, cols=shard_range(self.in_features, self.tp)))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """[T, in // tp_degree] -> partial [T, out]; a residual [T, out] is added on the group's rank 0 only, so
        the all-reduce of the partials adds it once."""
        return linear(x, self.weight, self.packed, residual if self.tp.tp_rank == 0 else None)


class VocabShardedWeight(nn.Module):
    """A [vocab, hidden] matrix of which this rank holds rows [start, end), zero-padded so every rank's shard
    has the same number of rows (equal shapes for the collectives)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.padded_rows = -(-vocab_size // tp.tp_degree)
        self.start = min(tp.tp_rank * self.padded_rows, vocab_size)
        self.end = min(self.start + self.padded_rows, vocab_size)
        self.weight = nn.Parameter(torch.empty(self.padded_rows, hidden_size, dtype=dtype), requires_grad=False)

    def load(self, reader: CheckpointReader, name: str) -> None:
        reader.check_shape(name, (self.vocab_size, self.hidden_size))
        self.weight.data.zero_()
        self.weight.data[: self.end - self.start].copy_(reader.read(name, rows=(self.start, self.end)))


class VocabParallelEmbedding(VocabShardedWeight):
    """Each rank embeds the token ids in its vocabulary shard; an all-reduce assembles the rows."""

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.tp_degree == 1:
            return F.embedding(token_ids, self.weight)
        owned = (token_ids >= self.start) & (token_ids < self.end)
        local_ids = torch.where(owned, token_ids - self.start, 0)
        rows = F.embedding(local_ids, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)  # [T, H]
        return self.tp.all_reduce(rows)


class ParallelLMHead(VocabShardedWeight, PackableLinear):
    """Logits for this rank's vocabulary shard; the stage gathers the shards on its leader."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(hidden)  # [B, H] -> [B, padded_rows]
