"""bf16 on CPU: where oneDNN has bf16 products (AVX-512 BF16, AMX) the linear layers run on packed bf16 weights,
elsewhere on torch's bf16 matmuls. Either way the engine must be as accurate as HF's own bf16 model: both are
measured against HF in fp32 on the same checkpoint (prefill logits of a few prompts)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy_requests, hf_greedy, load_hf, random_prompts, run_in_process

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.kv_budget import RankShape, rank_weight_bytes
from hexgen.engine.layers import PackableLinear, cpu_packs_bf16
from hexgen.engine.parallel import RankContext, TPGroup
from hexgen.engine.stage import LlamaStage
from hexgen.engine.weights import CheckpointReader
from hexgen.launch.spec import Layout

PROMPT_LENGTHS = [5, 17, 33]


def first_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    return [hf_greedy(model, p, 1)[1][0] for p in prompts]


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_bf16_engine_is_as_close_to_fp32_as_hf_bf16(name, tiny_model_dirs):
    directory = tiny_model_dirs[name]
    reference = load_hf(directory)
    prompts = random_prompts(reference.config.vocab_size, PROMPT_LENGTHS, seed=7)
    exact = first_logits(reference, prompts)
    hf_bf16 = first_logits(load_hf(directory, torch.bfloat16), prompts)

    source = resolve_model(str(directory), progress=False)
    _, logits = run_in_process(source, greedy_requests(prompts, 1), dtype="bfloat16")
    for i, expected in enumerate(exact):
        ours = logits[f"r{i}"][0].float()
        hf_error = (hf_bf16[i] - expected).abs().max().item()
        our_error = (ours - expected).abs().max().item()
        scale = expected.abs().max().item()
        assert hf_error > 0  # bf16 really rounds: the comparison measures something
        assert our_error <= 2 * hf_error + 1e-3 * scale, f"prompt {i}: {our_error} vs HF bf16's {hf_error}"


@pytest.mark.skipif(not cpu_packs_bf16(), reason="this CPU's oneDNN has no bf16 products")
def test_bf16_rank_holds_packed_bf16_weights_only(tiny_model_dirs):
    source = resolve_model(str(tiny_model_dirs["tied"]), progress=False)
    ctx = RankContext(Layout((1,), ((0, source.spec.num_layers),)), 0, TPGroup(0, 1), None)
    stage = LlamaStage(source.spec, ctx, torch.bfloat16, torch.device("cpu"))
    stage.load(CheckpointReader(source.directory, torch.bfloat16))
    stage.pack_weights()
    linears = [m for m in stage.modules() if isinstance(m, PackableLinear)]
    folding = [stage.lm_head]
    folding += [p for layer in stage.layers for p in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj)]
    assert linears and all(m.packed is not None and m.packed.dtype == torch.bfloat16 for m in linears)
    assert all(m.folds_norm() == (m in folding) for m in linears)  # each RMSNorm inside the projection after it
    assert all(m.weight.is_meta for m in linears if m is not stage.lm_head)  # dense copies dropped ...
    assert stage.lm_head.weight is stage.embed_tokens.weight and not stage.lm_head.weight.is_meta  # ... but the table
    assert not stage.rope_interleaved  # rotate-half RoPE: torch has no bf16 complex type
    # what the memory check counts: the tied table twice (embedding dense, head packed), 2 bytes an element
    shape = RankShape(source.spec.num_layers, 1, True, True)
    assert stage.weight_bytes() == rank_weight_bytes(source.spec, shape, 2, cpu_packed=True)
