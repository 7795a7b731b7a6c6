"""Each tensor-parallel layer on 2 and 3 gloo ranks against its unsharded torch twin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import spawn_ranks
from layer_ranks import COLUMN_PARTS, HIDDEN, IN_FEATURES, ROW_OUT, TOKENS, VOCAB, layer_rank
from safetensors.torch import save_file

from hexgen.engine.layers import VocabShardedWeight
from hexgen.engine.parallel import TPGroup


@pytest.fixture(scope="module", params=[2, 3])
def rank_outputs(request, tmp_path_factory):
    """(world size, full weights and inputs, per-rank outputs) of one spawned run."""
    world = request.param
    directory = tmp_path_factory.mktemp(f"layers-tp{world}")
    gen = torch.Generator().manual_seed(world)
    weights = {name: torch.randn(rows, IN_FEATURES, generator=gen) for name, rows in COLUMN_PARTS.items()}
    weights["row"] = torch.randn(ROW_OUT, IN_FEATURES, generator=gen)
    weights["embedding"] = torch.randn(VOCAB, HIDDEN, generator=gen)
    save_file(weights, str(directory / "model.safetensors"))
    # every id of the vocabulary (so every shard, including the padded last one, is hit), some twice
    ids = torch.cat([torch.randperm(VOCAB, generator=gen), torch.tensor([0, VOCAB - 1, 5])])
    inputs = {"x": torch.randn(TOKENS, IN_FEATURES, generator=gen), "ids": ids,
              "hidden": torch.randn(3, HIDDEN, generator=gen)}
    torch.save(inputs, directory / "inputs.pt")
    spawn_ranks(layer_rank, world, (world, str(directory)))
    outputs = [torch.load(directory / f"rank{r}.pt") for r in range(world)]
    return world, weights, inputs, outputs


def test_column_parallel_fused_projection(rank_outputs):
    world, weights, inputs, outputs = rank_outputs
    for rank, out in enumerate(outputs):
        assert len(out["column"]) == len(COLUMN_PARTS)
        for name, local in zip(COLUMN_PARTS, out["column"], strict=True):
            full = F.linear(inputs["x"], weights[name])  # [T, out]
            part = full.shape[1] // world
            torch.testing.assert_close(local, full[:, rank * part : (rank + 1) * part])


def test_row_parallel_partials_sum_to_unsharded(rank_outputs):
    world, weights, inputs, outputs = rank_outputs
    full = F.linear(inputs["x"], weights["row"])
    part = IN_FEATURES // world
    for rank, out in enumerate(outputs):
        cols = slice(rank * part, (rank + 1) * part)
        torch.testing.assert_close(out["row_partial"], F.linear(inputs["x"][:, cols], weights["row"][:, cols]))
        torch.testing.assert_close(out["row_reduced"], full)


def test_vocab_parallel_embedding_all_shards_and_padding(rank_outputs):
    world, weights, inputs, outputs = rank_outputs
    padded = -(-VOCAB // world)  # hand-computed: 6 rows per shard on 2 ranks, 4 on 3
    for rank, out in enumerate(outputs):
        torch.testing.assert_close(out["embedding"], F.embedding(inputs["ids"], weights["embedding"]))
        shard = out["embedding_weight"]
        assert shard.shape == (padded, HIDDEN)
        start, end = min(rank * padded, VOCAB), min((rank + 1) * padded, VOCAB)
        torch.testing.assert_close(shard[: end - start], weights["embedding"][start:end])
        assert torch.count_nonzero(shard[end - start :]) == 0
    assert (padded * world - VOCAB) > 0  # the configuration really has padding rows


def test_lm_head_gathers_full_logits_on_leader(rank_outputs):
    world, weights, inputs, outputs = rank_outputs
    full = F.linear(inputs["hidden"], weights["embedding"])  # [B, V]
    gathered = outputs[0]["head_gathered"]
    assert len(gathered) == world
    torch.testing.assert_close(torch.cat(gathered, dim=-1)[:, :VOCAB], full)
    assert all(out["head_gathered"] is None for out in outputs[1:])


@pytest.mark.parametrize(("vocab", "tp", "expected"), [
    (11, 2, [(0, 6), (6, 11)]),
    (11, 3, [(0, 4), (4, 8), (8, 11)]),
    (250, 4, [(0, 63), (63, 126), (126, 189), (189, 250)]),
    (3, 4, [(0, 1), (1, 2), (2, 3), (3, 3)]),  # more ranks than rows: the last shard is all padding
])
def test_vocab_shard_ranges(vocab, tp, expected):
    shards = [VocabShardedWeight(vocab, 4, TPGroup(r, tp), torch.float32) for r in range(tp)]
    assert [(s.start, s.end) for s in shards] == expected
