"""A CPU fp32 rank holds its linear weights once, in oneDNN's packed layout: the dense copy is dropped after packing,
except the embedding table a tied LM head shares. Bytes held are counted by hand for the `tied` tiny model."""

from __future__ import annotations

import pytest
import torch

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.kv_budget import RankShape, rank_weight_bytes
from hexgen.engine.layers import PackableLinear, packs_for_cpu
from hexgen.engine.parallel import RankContext, TPGroup
from hexgen.engine.stage import LlamaStage
from hexgen.engine.weights import CheckpointReader
from hexgen.launch.spec import Layout

pytestmark = pytest.mark.skipif(not packs_for_cpu(torch.empty(1)), reason="oneDNN packing is not available")

# conftest's `tied` model: vocab 256, hidden 64, MLP 128, 4 layers, 4 heads / 2 KV heads of 16 (fp32, 4 bytes)
VOCAB, HIDDEN, MLP, KV_DIM = 256, 64, 128, 2 * 16
# q|k|v, o, gate|up, down
LINEARS_PER_LAYER = (HIDDEN + 2 * KV_DIM) * HIDDEN + HIDDEN * HIDDEN + 2 * MLP * HIDDEN + HIDDEN * MLP
NORMS_PER_LAYER = 2 * HIDDEN


def packed_stage(model_dir, tp: tuple[int, ...], layers: tuple[tuple[int, int], ...], rank: int) -> LlamaStage:
    source = resolve_model(str(model_dir), progress=False)
    ctx = RankContext(Layout(tp, layers), rank, TPGroup(0, 1), None)  # no collectives: load and pack only
    stage = LlamaStage(source.spec, ctx, torch.float32, torch.device("cpu"))
    stage.load(CheckpointReader(source.directory, torch.float32))
    stage.pack_weights()
    return stage


def storage_bytes(stage: LlamaStage) -> int:
    """Bytes of the distinct storages behind the stage's parameters, plus its packed copies (oneDNN tensors, whose
    storage torch does not expose: their element count)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in stage.parameters() if not p.is_meta}
    packed = [m.packed for m in stage.modules() if isinstance(m, PackableLinear) and m.packed is not None]
    return sum(storages.values()) + sum(t.numel() * t.element_size() for t in packed)


def test_one_process_keeps_the_tied_table_and_drops_every_other_dense_weight(tiny_model_dirs):
    stage = packed_stage(tiny_model_dirs["tied"], (1,), ((0, 4),), 0)
    for module in stage.modules():
        if isinstance(module, PackableLinear):
            assert module.packed is not None
    assert stage.lm_head.weight is stage.embed_tokens.weight and not stage.lm_head.weight.is_meta
    for layer in stage.layers:
        for projection in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj):
            assert projection.weight.is_meta and projection.weight.shape[1] in (HIDDEN, MLP)

    # embedding (dense, shared with the head) + 4 layers (norms + packed linears) + final norm + packed head
    expected = 4 * (VOCAB * HIDDEN + 4 * (NORMS_PER_LAYER + LINEARS_PER_LAYER) + HIDDEN + VOCAB * HIDDEN)
    assert storage_bytes(stage) == expected
    assert stage.weight_bytes() == expected
    assert rank_weight_bytes(stage.spec, RankShape(4, 1, True, True), 4, cpu_packed=True) == expected


def test_a_last_stage_without_the_embedding_drops_its_head_copy(tiny_model_dirs):
    stage = packed_stage(tiny_model_dirs["tied"], (1, 1), ((0, 1), (1, 4)), 1)
    assert stage.embed_tokens is None and stage.lm_head.weight.is_meta and stage.lm_head.packed is not None
    expected = 4 * (3 * (NORMS_PER_LAYER + LINEARS_PER_LAYER) + HIDDEN + VOCAB * HIDDEN)
    assert storage_bytes(stage) == expected == stage.weight_bytes()
    assert rank_weight_bytes(stage.spec, RankShape(3, 1, False, True), 4, cpu_packed=True) == expected


def test_a_dropped_weight_fails_loudly_if_read(tiny_model_dirs):
    stage = packed_stage(tiny_model_dirs["tied"], (1,), ((0, 4),), 0)
    with pytest.raises((NotImplementedError, RuntimeError)):
        stage.layers[0].mlp.down_proj.weight.sum().item()
