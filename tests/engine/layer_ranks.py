"""What each spawned rank of test_parallel_layers runs: build every parallel layer from a checkpoint,
run it on the same inputs, and save its outputs for the parent to compare with the unsharded ops."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from hexgen.engine.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from hexgen.engine.parallel import TPGroup
from hexgen.engine.weights import CheckpointReader

# Shapes divisible by 2 and 3 except the vocabulary, which needs padding for both.
IN_FEATURES = 12
COLUMN_PARTS = {"q": 12, "k": 6, "v": 6}
ROW_OUT = 7
VOCAB = 11
HIDDEN = 4
TOKENS = 5


def layer_rank(rank: int, port: int, world_size: int, directory: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    tp = TPGroup(rank, world_size, dist.new_group(list(range(world_size))))
    reader = CheckpointReader(directory, torch.float32)
    inputs = torch.load(Path(directory) / "inputs.pt")
    out: dict[str, object] = {}
    with torch.no_grad():
        column = ColumnParallelLinear(IN_FEATURES, list(COLUMN_PARTS.values()), tp, torch.float32)
        column.load(reader, list(COLUMN_PARTS))
        out["column"] = column(inputs["x"])

        row = RowParallelLinear(IN_FEATURES, ROW_OUT, tp, torch.float32)
        row.load(reader, "row")
        part = IN_FEATURES // world_size
        partial = row(inputs["x"][:, rank * part : (rank + 1) * part])
        out["row_partial"] = partial.clone()
        out["row_reduced"] = tp.all_reduce(partial)

        embedding = VocabParallelEmbedding(VOCAB, HIDDEN, tp, torch.float32)
        embedding.load(reader, "embedding")
        out["embedding_weight"] = embedding.weight.clone()
        out["embedding"] = embedding(inputs["ids"])

        head = ParallelLMHead(VOCAB, HIDDEN, tp, torch.float32)
        head.load(reader, "embedding")
        local = head(inputs["hidden"])
        out["head_local"] = local
        out["head_gathered"] = tp.gather_to_leader(local)
    torch.save(out, Path(directory) / f"rank{rank}.pt")
    dist.destroy_process_group()
