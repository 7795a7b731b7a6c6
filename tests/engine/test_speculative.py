"""Speculative decoding with n-gram drafts: drafts change how many tokens a step yields, never which. Every
request's tokens (greedy against HF transformers, seeded draws, stop tokens and token limits inside accepted drafts,
log-probabilities) equal the run without drafts, in one process, with the prefix cache, and through a pipeline."""

from __future__ import annotations

import pytest
from engine_helpers import hf_greedy, load_hf, random_prompts, run_in_process, run_layout_with_logits

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.messages import GenerationRequest, SamplingParams
from hexgen.engine.ngram import propose_drafts
from hexgen.engine.scheduler import SchedulerConfig

NEW_TOKENS = 24


def repetitive_prompts(vocab_size: int) -> list[list[int]]:
    """Prompts that repeat a phrase (so the n-gram lookup has matches to draft from at once) and ones that do not."""
    phrases = random_prompts(vocab_size, [5, 3], seed=41)
    return [phrases[0] * 3, phrases[1] * 4 + phrases[0], *random_prompts(vocab_size, [9, 12], seed=42)]


def requests_of(prompts: list[list[int]], stops: dict[int, int] | None = None) -> list[GenerationRequest]:
    """Greedy requests (one with a stop token, where `stops` names one), one capped at 7 tokens, a seeded draw and
    one asking for log-probabilities."""
    stops = stops or {}
    settings = [dict(stop_token_ids=(stops[0],) if 0 in stops else ()), dict(max_new_tokens=7),
                dict(temperature=0.9, top_k=30, seed=4), dict(logprobs=2)]
    return [GenerationRequest(f"s{i}", tuple(p), SamplingParams(**{"max_new_tokens": NEW_TOKENS, "ignore_eos": True,
                                                                    **extra}))
            for i, (p, extra) in enumerate(zip(prompts, settings, strict=True))]


def run(source, requests, **config) -> tuple[dict, list, object]:
    events: list = []
    engines: list = []
    tokens, _ = run_in_process(source, requests, SchedulerConfig(max_context=source.spec.max_context, **config),
                               events=events, engines=engines)
    return tokens, [e for e in events if e.token_id is not None], engines[0].scheduler


@pytest.fixture(scope="module")
def looping_model_dir(tmp_path_factory):
    """A random Llama with small weights (initializer_range 0.05), whose greedy continuations fall into loops of
    a few tokens (the test models of tests/conftest.py are made not to): drafts are then both accepted and not."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.05, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    directory = tmp_path_factory.mktemp("looping-llama") / "model"
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def setup(looping_model_dir):
    directory = looping_model_dir
    source = resolve_model(str(directory), progress=False)
    prompts = repetitive_prompts(source.spec.vocab_size)
    plain, _, _ = run(source, requests_of(prompts))
    stops = {0: plain["s0"][NEW_TOKENS // 2]}  # a stop token the greedy answer reaches halfway
    requests = requests_of(prompts, stops)
    expected, expected_events, _ = run(source, requests)
    return directory, source, requests, expected, expected_events


def test_drafted_run_equals_the_run_without_drafts(setup):
    """Asked to overlap its steps too, the engine does not: a sequence always looked ahead would never draft."""
    directory, source, requests, expected, expected_events = setup
    engines: list = []
    events: list = []
    config = SchedulerConfig(max_context=source.spec.max_context, speculative_tokens=4, overlap_steps=True)
    tokens, _ = run_in_process(source, requests, config, events=events, engines=engines)
    events = [e for e in events if e.token_id is not None]
    scheduler = engines[0].scheduler
    assert not engines[0].overlap
    assert scheduler.num_accepted > 0 and scheduler.num_drafted > scheduler.num_accepted  # both outcomes happened
    assert tokens == expected
    assert len(tokens["s0"]) < NEW_TOKENS and len(tokens["s1"]) == 7  # the stop token and the limit held
    model = load_hf(directory)
    assert tokens["s3"] == hf_greedy(model, list(requests[3].prompt_token_ids), NEW_TOKENS)[0]
    mine = [e.logprobs for e in events if e.request_id == "s3"]
    theirs = [e.logprobs for e in expected_events if e.request_id == "s3"]
    assert [lp.logprob for lp in mine] == pytest.approx([lp.logprob for lp in theirs], abs=1e-4)
    assert [[i for i, _ in lp.top] for lp in mine] == [[i for i, _ in lp.top] for lp in theirs]


@pytest.mark.gpu
def test_drafts_on_cuda_equal_the_run_without(setup):
    """On CUDA (plain decodes from CUDA graphs, drafted ones eager, several tokens a sequence verified by the
    Triton kernels): the run without drafts' tokens on CUDA, and the CPU's for the greedy requests."""
    _, source, requests, expected, _ = setup
    plain, _ = run_in_process(source, requests, SchedulerConfig(max_context=source.spec.max_context), device="cuda")
    engines: list = []
    config = SchedulerConfig(max_context=source.spec.max_context, speculative_tokens=4)
    drafted, _ = run_in_process(source, requests, config, device="cuda", engines=engines)
    assert engines[0].scheduler.num_accepted > 0
    assert drafted == plain
    greedy = [r.request_id for r in requests if r.params.temperature == 0]
    assert [drafted[rid] for rid in greedy] == [expected[rid] for rid in greedy]


def test_drafts_with_the_prefix_cache_and_small_steps_equal_the_run_without(setup):
    """Accepted drafts fill blocks that the prefix cache then registers (their keys must be the tokens kept), and a
    step budget of 6 tokens leaves some decodes room for fewer drafts."""
    _, source, requests, expected, _ = setup
    shared = [GenerationRequest(f"{r.request_id}-again", r.prompt_token_ids, r.params) for r in requests]
    config = dict(prefix_caching=True, block_size=4, max_step_tokens=16)
    tokens, _, scheduler = run(source, [*requests, *shared], speculative_tokens=3, speculative_max_seqs=8, **config)
    assert scheduler.num_prefix_hit_tokens > 0 and scheduler.num_accepted > 0
    for request in requests:
        assert tokens[request.request_id] == tokens[f"{request.request_id}-again"] == expected[request.request_id]


def test_drafts_through_a_pipeline_equal_the_run_without(setup, tmp_path):
    directory, _, requests, expected, _ = setup
    config = SchedulerConfig(max_context=256, speculative_tokens=4)
    tokens, _ = run_layout_with_logits(directory, [1, 2, 1], [1, 2, 1], requests, tmp_path, config=config)
    assert tokens == expected


def test_no_drafts_beyond_the_batch_limit_for_them(setup):
    _, source, requests, expected, _ = setup
    tokens, _, scheduler = run(source, requests, speculative_tokens=4, speculative_max_seqs=2)
    assert tokens == expected
    alone, _, alone_scheduler = run(source, requests[:1], speculative_tokens=4, speculative_max_seqs=2)
    assert alone_scheduler.num_drafted > 0 and alone["s0"] == expected["s0"]
    assert scheduler.num_drafted < alone_scheduler.num_drafted * len(requests)


def test_ngram_proposals_hand_computed():
    assert propose_drafts([1, 2, 3, 4, 1, 2, 3], 3) == [4, 1, 2]  # the 3-gram 1 2 3 occurred at the start
    assert propose_drafts([1, 2, 3, 4, 9, 2, 3], 2) == [4, 9]  # only the 2-gram 2 3 occurred before
    assert propose_drafts([5, 6, 7], 3) == [] and propose_drafts([1, 2, 1, 2], 0) == []
    assert propose_drafts([8, 1, 2, 9, 1, 2, 7, 1, 2], 1) == [7]  # the latest occurrence wins
