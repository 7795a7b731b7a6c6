"""The engine's CUDA path, run on CPU: every Triton kernel under Triton's interpreter, wired together as on a GPU.

On CUDA a decoder layer runs five Triton kernels (fused add + RMSNorm, RoPE + KV write, paged attention, SiLU * up)
between its projections, reads keys through the block tables instead of gathering them, and decode steps replay
CUDA graphs over static buffers. Here the same code runs on CPU tensors: `kernel_path` makes the engine take its
kernel path (no oneDNN packing, no folded norms), and graphs are stood in for by RecordedReplays (engine_helpers):
a capture records every op and kernel launch over the static buffers, a replay re-runs them without the layers'
Python, so everything the graphs' host side does (bucket choice, padding rows, block-table columns left over from
longer sequences) and what a capture fixes is checked against the CPU's own gather path, in one process and across
ranks. What a real graph adds (capture on a GPU, NCCL inside it) is left to the `gpu` tests.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace

import pytest
import torch
from engine_helpers import (
    RecordedReplays,
    layout_logprobs,
    random_prompts,
    run_in_process,
    run_layout_with_logits,
)

from hexgen.engine import cuda_graphs
from hexgen.engine.messages import GenerationRequest, SamplingParams
from hexgen.engine.runner import StageRunner
from hexgen.engine.scheduler import SchedulerConfig

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or torch.cuda.is_available()
    or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton's interpreter (TRITON_INTERPRET=1, no GPU visible)",
)


@pytest.fixture(scope="module")
def two_layer_dir(tmp_path_factory):
    """A 2-layer GQA Llama (8 heads over 4 KV heads, head_dim 8): the interpreter runs each kernel in Python."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hexgen.engine.checkpoint import resolve_model

    torch.manual_seed(11)
    config = LlamaConfig(vocab_size=192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                         initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # a wrong norm cannot hide behind all-ones
    directory = tmp_path_factory.mktemp("two-layer") / "model"
    model.save_pretrained(directory)
    return resolve_model(str(directory), progress=False)


@pytest.fixture
def kernel_path():
    """Route CPU steps through the Triton kernels and the kernel metadata, as on CUDA (no oneDNN copies, no
    folded norms)."""
    from hexgen.engine.launch_count import cuda_path_on_cpu

    with cuda_path_on_cpu():
        yield


def requests_of_unequal_lengths(vocab_size: int) -> list[GenerationRequest]:
    """Eight sequences that finish at different steps (graph rows later hold shorter sequences than before): six
    greedy, one drawn with a seed (temperature, top-k, top-p), one greedy under penalties and a logit bias on a token
    it then repeats (penalized and biased at once)."""
    prompts = random_prompts(vocab_size, [13, 5, 9, 3, 11, 7, 6, 8], seed=5)
    lengths = [3, 9, 4, 12, 6, 2, 5, 8]
    settings = [{}] * 6 + [dict(temperature=0.9, top_k=50, top_p=0.9, seed=7),
                           dict(presence_penalty=0.5, frequency_penalty=1.0, logit_bias=((prompts[7][0], 4.0),))]
    return [GenerationRequest(f"r{i}", tuple(p), SamplingParams(max_new_tokens=n, ignore_eos=True, **extra))
            for i, (p, n, extra) in enumerate(zip(prompts, lengths, settings, strict=True))]


CONFIG = SchedulerConfig(max_running_seqs=8, max_context=64, block_size=4, max_step_tokens=16)


@pytest.fixture(scope="module")
def cpu_run(two_layer_dir):
    """The reference: the CPU path (oneDNN projections, folded norms, keys gathered through the block tables)."""
    return run_in_process(two_layer_dir, requests_of_unequal_lengths(two_layer_dir.spec.vocab_size), CONFIG)


@pytest.mark.parametrize("kv_splits", [1, 3])
def test_kernel_path_gives_the_cpu_paths_tokens(two_layer_dir, cpu_run, kernel_path, monkeypatch, kv_splits):
    """The kernels between the projections and attention through the block tables, eager: the CPU path's greedy
    tokens and logits, with prefill chunks and decodes mixed (4-token blocks, at most 16 tokens a step). Decode
    steps split each sequence's keys over `kv_splits` programs, as on a GPU when few sequences decode (on CPU the
    engine picks 1)."""
    from hexgen.engine import kernels

    monkeypatch.setattr(kernels, "choose_kv_splits", lambda *args: kv_splits)
    requests = requests_of_unequal_lengths(two_layer_dir.spec.vocab_size)
    tokens, logits = run_in_process(two_layer_dir, requests, replace(CONFIG, enforce_eager=True))
    cpu_tokens, cpu_logits = cpu_run
    assert [len(t) for t in tokens.values()] == [r.params.max_new_tokens for r in requests]
    assert tokens == cpu_tokens
    for request_id, rows in logits.items():
        torch.testing.assert_close(rows, cpu_logits[request_id], rtol=1e-4, atol=1e-4)


def test_tiles_the_timings_choose_serve_the_steps(two_layer_dir, cpu_run, monkeypatch):
    """The rank times the attention tiles once its pool exists (here a scripted timer makes the second decode and
    the second prefill candidates, 128-key and 128-row tiles, the fastest): every later step launches with them,
    and the tokens stay the CPU path's."""
    from hexgen.engine.kernels import attention
    from hexgen.engine.launch_count import cuda_path_on_cpu

    monkeypatch.setattr(attention, "_chosen", {})
    times = iter([2.0, 1.0, 3.0, 2.0, 1.0, 3.0])  # decode candidates, then prefill ones
    launched: list[attention.Tiles] = []
    tiles_for = attention.tiles_for

    def spy(q, k_cache, decode):
        launched.append(tiles_for(q, k_cache, decode))
        return launched[-1]

    monkeypatch.setattr(attention, "tiles_for", spy)
    with cuda_path_on_cpu(tile_timer=lambda run: next(times)):
        requests = requests_of_unequal_lengths(two_layer_dir.spec.vocab_size)
        tokens, _ = run_in_process(two_layer_dir, requests, replace(CONFIG, enforce_eager=True))
    assert tokens == cpu_run[0]
    assert set(launched) == {attention.DECODE_TILES[1], attention.PREFILL_TILES[1]}


@pytest.mark.parametrize("overlap", [False, True])
def test_decode_graphs_host_side_gives_the_cpu_paths_tokens(two_layer_dir, cpu_run, kernel_path, monkeypatch,
                                                            overlap):
    """Decode steps through DecodeGraphs (static buffers, buckets, padding rows with slot -1, only the filled
    block-table columns copied), each replay re-running what its capture recorded (RecordedReplays): the CPU
    path's tokens, over several buckets as sequences end; no host sync inside a capture; no step's output a view of
    a graph's static output. Key splits as an H200 (132 SMs) would choose them with ranges of >= 16 keys: the
    graphs keep the count their capture chose for the context limit, 4, the eager steps choose afresh. With
    `overlap`, as a one-GPU replica runs by default: each look-ahead step is queued before the step in flight is
    back, its decodes' tokens fed back from that step's samples into the graphs' buffers."""
    from hexgen.engine import kernels
    from hexgen.engine.kernels import attention

    monkeypatch.setattr(cuda_graphs, "DecodeGraphs", RecordedReplays)
    monkeypatch.setattr(attention, "SPLIT_MIN_POSITIONS", 16)
    chosen: list[int] = []

    def h200_splits(num_seqs, num_kv_heads, max_context_len, device):
        chosen.append(attention.kv_splits_for(num_seqs, num_kv_heads, max_context_len, 132))
        return chosen[-1]

    monkeypatch.setattr(kernels, "choose_kv_splits", h200_splits)
    RecordedReplays.replayed.clear()
    RecordedReplays.aliased = 0
    RecordedReplays.refused.clear()
    fed_back: list[int] = []  # decodes per step whose input token came from the step before's samples
    token_ids = StageRunner._token_ids

    def spy(runner, plan):
        fed_back.append(len(plan.fed_back))
        return token_ids(runner, plan)

    monkeypatch.setattr(StageRunner, "_token_ids", spy)
    config = replace(CONFIG, overlap_steps=overlap)
    tokens, _ = run_in_process(two_layer_dir, requests_of_unequal_lengths(two_layer_dir.spec.vocab_size), config)
    assert (sum(fed_back) > 0) is overlap
    assert tokens == cpu_run[0]
    # six sequences decoding, then fewer as they finish: buckets 8 (6 rows), 4 (4 and 3 rows), 2 and 1
    assert {8, 4, 2, 1} <= set(RecordedReplays.replayed), RecordedReplays.replayed
    # what a step returns is its own: a pipeline stage's asynchronous send of it may outlast the next replay
    assert RecordedReplays.aliased == 0
    assert RecordedReplays.refused == []
    assert max(chosen) == 4  # 64 // 16: the captures' (the warm-up and capture of each bucket)


def test_the_cuda_path_across_ranks_gives_the_cpu_paths_tokens_and_logprobs(two_layer_dir, cpu_run, tmp_path):
    """TP 2 | TP 1 (a layer each), both stages' micro-batches in flight as on GPUs, every rank on the CUDA path
    (Triton kernels on its own heads, decode graphs replayed from what their capture recorded, the TP all-reduces
    among it, two key ranges per decoding sequence, TP all-reduces over the process group as NCCL's are, not the
    CPU's shared-memory shortcut): the one-process CPU
    path's greedy tokens and logits, and each token's log-probability and two most likely alternatives as the
    log-softmax of those logits gives them."""
    requests = [replace(r, params=replace(r.params, logprobs=2))
                for r in requests_of_unequal_lengths(two_layer_dir.spec.vocab_size)]
    tokens, logits = run_layout_with_logits(two_layer_dir.directory, [2, 1], [1, 1], requests, tmp_path, depth=0,
                                            config=CONFIG, cuda_path_kv_splits=2)
    cpu_tokens, cpu_logits = cpu_run
    assert tokens == cpu_tokens
    replays = [torch.load(tmp_path / f"replays{rank}.pt") for rank in range(3)]
    assert replays[0] == replays[1] and len(replays[0]) > 0 and len(replays[2]) > 0  # a TP pair replays in step
    for request_id, entries in layout_logprobs(tmp_path).items():
        torch.testing.assert_close(logits[request_id], cpu_logits[request_id], rtol=1e-4, atol=1e-4)
        expected = torch.log_softmax(cpu_logits[request_id].double(), dim=-1)
        assert len(entries) == len(tokens[request_id])
        for row, (token, (logprob, top)) in zip(expected, zip(tokens[request_id], entries, strict=True), strict=True):
            assert logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert [t for t, _ in top] == row.topk(2).indices.tolist()
            assert [lp for _, lp in top] == pytest.approx(row.topk(2).values.tolist(), abs=1e-4)


def test_a_decode_step_launches_nine_kernels_per_layer_whatever_the_batch(two_layer_dir):
    """What a decode step launches on a GPU, counted on the CUDA path run here (hexgen/engine/launch_count.py): per
    layer the four projections, two fused add + RMSNorm, RoPE + KV write, attention and SiLU * up, plus the merge
    when keys are split; outside the layers the embedding, the gathers of RoPE rows and of each sequence's last
    row, the last residual add, the final norm, the LM head and the argmax. No count grows with the batch, and a
    32-layer model (Llama-3-8B) stays within 12 launches per layer per step, greedy or sampled."""
    from hexgen.engine.launch_count import count_decode_launches

    directory = str(two_layer_dir.directory)
    per_layer = {"aten.linear": 4, "triton add_rms_norm_kernel": 2, "triton rotary_write_kv_kernel": 1,
                 "triton paged_attention_kernel": 1, "triton merge_splits_kernel": 1, "triton silu_mul_kernel": 1}
    greedy_outside = {"aten.embedding": 1, "aten.index.Tensor": 4, "aten.add.Tensor": 1,
                      "triton add_rms_norm_kernel": 1, "aten.linear": 1, "aten.argmax": 1}
    sampled_outside = {}
    for batch in (1, 16):
        greedy = count_decode_launches(directory, batch, kv_splits=2)
        assert {name: n / greedy.num_layers for name, n in greedy.in_layers.items()} == per_layer
        assert greedy.outside == greedy_outside
        sampled = count_decode_launches(directory, batch, sampled=True, kv_splits=2)
        assert sampled.in_layers == greedy.in_layers
        sampled_outside[batch] = sampled.outside
        assert greedy.per_layer_of_model(32) < sampled.per_layer_of_model(32) <= 12
    assert sampled_outside[1] == sampled_outside[16]
