"""Log-probabilities of sampled tokens: the model's own (log-softmax of its logits, whatever the draw's settings),
against HF transformers run over the same tokens, from one process and through a pipeline whose last stage sends
them back to the driver with the token ids."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import (
    greedy_requests,
    layout_logprobs,
    load_hf,
    random_prompts,
    run_in_process,
    run_layout_with_logits,
)

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.messages import GenerationRequest, SampleRow, SamplingParams, ScoredTokens, StepPlan, TokenLogprobs
from hexgen.engine.sampler import logprob_width, sample_table, unpack_samples
from hexgen.engine.scheduler import SchedulerConfig

NEW_TOKENS = 6


def requests_of(prompts: list[list[int]], with_logprobs: bool) -> list[GenerationRequest]:
    """Greedy requests asking for 3 / none / 0 alternatives, then a sampled one (temperature 0.9, top-k 50,
    seeded) asking for 2: log-probabilities stay the model's, not the warped distribution the draw uses."""
    settings = [dict(logprobs=3), dict(), dict(logprobs=0), dict(temperature=0.9, top_k=50, seed=5, logprobs=2)]
    requests = []
    for i, (prompt, extra) in enumerate(zip(prompts, settings, strict=True)):
        if not with_logprobs:
            extra = {k: v for k, v in extra.items() if k != "logprobs"}
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, **extra)
        requests.append(GenerationRequest(f"r{i}", tuple(prompt), params))
    return requests


def hf_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] log-softmax of HF's logits at each generated token's position (teacher-forced)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(dim=-1)


def assert_matches_hf(model, request: GenerationRequest, tokens: list[int], logprobs: list, atol: float) -> None:
    """logprobs: per token (log-probability, ((id, log-probability), ...)) or None, as the request asked."""
    wanted = request.params.logprobs
    if wanted is None:
        assert logprobs == [None] * len(tokens)
        return
    reference = hf_logprobs(model, list(request.prompt_token_ids), tokens)
    for step, (token, (logprob, top)) in enumerate(zip(tokens, logprobs, strict=True)):
        assert math.isclose(logprob, reference[step, token].item(), abs_tol=atol)
        values, ids = reference[step].topk(wanted)
        assert [i for i, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=atol)


@pytest.mark.parametrize("overlap", [False, True])
def test_logprobs_of_one_process_match_transformers(overlap, tiny_model_dirs):
    """Prompts longer than a step's token budget (8), so some steps carry rows that sample nothing beside rows
    that do: each event gets its own row's values. With `overlap` the engine's look-ahead steps (a one-GPU
    replica's default) feed the sampled ids back on the device while the table of the step goes to the host."""
    directory = tiny_model_dirs["gqa"]
    source = resolve_model(str(directory), progress=False)
    prompts = random_prompts(source.spec.vocab_size, [13, 4, 9, 6], seed=21)
    config = SchedulerConfig(max_context=source.spec.max_context, max_step_tokens=8, overlap_steps=overlap)
    events: list = []
    engines: list = []
    tokens, _ = run_in_process(source, requests_of(prompts, True), config, events=events, engines=engines)
    assert engines[0].overlap == overlap
    plain, _ = run_in_process(source, requests_of(prompts, False), config)
    assert tokens == plain  # asking for log-probabilities changes no token
    model = load_hf(directory)
    for request in requests_of(prompts, True):
        mine = [e for e in events if e.request_id == request.request_id and e.token_id is not None]
        logprobs = [None if e.logprobs is None else (e.logprobs.logprob, e.logprobs.top) for e in mine]
        assert_matches_hf(model, request, tokens[request.request_id], logprobs, atol=1e-4)


def test_logprobs_through_a_pipeline_match_transformers(tiny_model_dirs, tmp_path):
    """Stages TP 1 | TP 2 | TP 1 with micro-batches in flight: the last stage's leader sends the driver a table of
    ids and log-probabilities whose width the driver derives from the plan alone."""
    directory = tiny_model_dirs["gqa"]
    source = resolve_model(str(directory), progress=False)
    prompts = random_prompts(source.spec.vocab_size, [13, 4, 9, 6], seed=22)
    requests = requests_of(prompts, True)
    tokens, _ = run_layout_with_logits(directory, [1, 2, 1], [2, 2, 2], requests, tmp_path)
    expected, _ = run_in_process(source, requests, SchedulerConfig(max_context=source.spec.max_context))
    assert tokens == expected
    model = load_hf(directory)
    logprobs = layout_logprobs(tmp_path)
    for request in requests:
        assert_matches_hf(model, request, tokens[request.request_id], logprobs[request.request_id], atol=1e-4)


def prompt_requests(prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[GenerationRequest]:
    """Greedy requests, three of them scoring their prompts (3, 0 and 1 alternatives), one also asking for its
    own tokens' log-probabilities."""
    settings = [dict(prompt_logprobs=3), dict(), dict(prompt_logprobs=0, logprobs=2), dict(prompt_logprobs=1)]
    return [GenerationRequest(f"p{i}", tuple(prompt), SamplingParams(max_new_tokens=new_tokens, ignore_eos=True,
                                                                     **extra))
            for i, (prompt, extra) in enumerate(zip(prompts, settings, strict=True))]


def assert_prompt_scores_match_hf(model, requests: list[GenerationRequest], events: list,
                                  tolerance: float = 1e-4) -> None:
    """Each scoring request's first event carries one score per prompt token from the second on, against HF's
    log-softmax over the prompt (within `tolerance`); no other event carries any."""
    for request in requests:
        mine = [e for e in events if e.request_id == request.request_id and e.token_id is not None]
        assert all(e.prompt_logprobs is None for e in mine[1:])
        wanted = request.params.prompt_logprobs
        if wanted is None:
            assert mine[0].prompt_logprobs is None
            continue
        prompt = list(request.prompt_token_ids)
        with torch.no_grad():
            reference = model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(dim=-1)
        scores = mine[0].prompt_logprobs
        assert len(scores) == len(prompt) - 1
        for step, (score, token) in enumerate(zip(scores, prompt[1:], strict=True)):
            assert math.isclose(score.logprob, reference[step, token].item(), abs_tol=tolerance)
            values, ids = reference[step].topk(wanted)
            assert [i for i, _ in score.top] == ids.tolist()
            assert [v for _, v in score.top] == pytest.approx(values.tolist(), abs=tolerance)


@pytest.mark.parametrize("overlap", [False, True])
def test_prompt_logprobs_match_transformers_in_chunks_beside_the_prefix_cache(overlap, tiny_model_dirs):
    """Prompts in chunks of a step's 8-token budget; all share their first 9 tokens with the prefix cache on, so a
    request that scores its prompt must compute those positions rather than take cached blocks."""
    directory = tiny_model_dirs["gqa"]
    source = resolve_model(str(directory), progress=False)
    prefix = random_prompts(source.spec.vocab_size, [9], seed=24)[0]
    prompts = [prefix + tail for tail in random_prompts(source.spec.vocab_size, [11, 1, 6, 3], seed=25)]
    config = SchedulerConfig(max_context=source.spec.max_context, max_step_tokens=8, block_size=4,
                             prefix_caching=True, overlap_steps=overlap)
    events: list = []
    requests = prompt_requests(prompts)
    tokens, _ = run_in_process(source, requests, config, events=events)
    plain, _ = run_in_process(source, greedy_requests(prompts, NEW_TOKENS, tag="p"), config)
    assert tokens == plain
    assert_prompt_scores_match_hf(load_hf(directory), requests, events)


def test_prompt_logprobs_survive_a_preemption_and_a_pipeline(tiny_model_dirs, tmp_path):
    """A KV pool too small for every sequence: sequences are preempted and recomputed, their prompts scored once
    (the scores come with the first token, before any preemption could repeat them). Then the same requests
    through stages TP 1 | TP 2 | TP 1, whose last stage sends the scores with the step's tokens."""
    directory = tiny_model_dirs["gqa"]
    source = resolve_model(str(directory), progress=False)
    prompts = random_prompts(source.spec.vocab_size, [9, 7, 11, 5], seed=26)
    requests = prompt_requests(prompts, new_tokens=10)  # four sequences of ~20 tokens in 8 blocks of 4
    engines: list = []
    events: list = []
    config = SchedulerConfig(max_running_seqs=4, max_context=source.spec.max_context, block_size=4, num_kv_blocks=8)
    tokens, _ = run_in_process(source, requests, config, events=events, engines=engines)
    assert engines[0].scheduler.num_preemptions > 0
    model = load_hf(directory)
    assert_prompt_scores_match_hf(model, requests, events)
    layout_tokens, _ = run_layout_with_logits(directory, [1, 2, 1], [2, 2, 2], requests, tmp_path)
    assert layout_tokens == tokens
    firsts = {rid: scores[0] for rid, scores in layout_logprobs(tmp_path, prompt=True).items()}
    for request in requests:
        mine = [e for e in events if e.request_id == request.request_id and e.token_id is not None][0]
        if mine.prompt_logprobs is None:
            assert firsts[request.request_id] is None
            continue
        assert [lp for lp, _ in firsts[request.request_id]] == pytest.approx(
            [s.logprob for s in mine.prompt_logprobs], abs=1e-4)


@pytest.mark.gpu
def test_logprobs_and_penalties_on_cuda_match_the_cpu(tiny_model_dirs):
    """On CUDA (graphs, Triton kernels, look-ahead steps by default, penalized requests waiting for their tokens):
    the greedy tokens and every log-probability of the CPU run, within the devices' rounding."""
    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    prompts = random_prompts(source.spec.vocab_size, [13, 4, 9, 6], seed=23)
    requests = [r if r.request_id != "r1" else GenerationRequest(
        "r1", r.prompt_token_ids, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1,
                                                 frequency_penalty=1.0, logit_bias=((3, 2.0),)))
        for r in requests_of(prompts, True)]
    config = SchedulerConfig(max_context=source.spec.max_context)
    results = {}
    for device in ("cpu", "cuda"):
        events: list = []
        tokens, _ = run_in_process(source, requests, config, device=device, events=events)
        results[device] = tokens, {(e.request_id, i): e.logprobs for i, e in enumerate(
            e for e in events if e.token_id is not None)}
    greedy = [r.request_id for r in requests if r.params.temperature == 0]
    assert [results["cuda"][0][rid] for rid in greedy] == [results["cpu"][0][rid] for rid in greedy]
    cpu_logprobs = {rid: [lp for (r, _), lp in results["cpu"][1].items() if r == rid] for rid in greedy}
    cuda_logprobs = {rid: [lp for (r, _), lp in results["cuda"][1].items() if r == rid] for rid in greedy}
    for rid in greedy:
        for mine, theirs in zip(cuda_logprobs[rid], cpu_logprobs[rid], strict=True):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-3)
                assert [i for i, _ in mine.top] == [i for i, _ in theirs.top]


@pytest.mark.gpu
def test_prompt_logprobs_on_cuda_match_transformers(tiny_model_dirs):
    """On CUDA (prompts in chunks of 8 tokens through the Triton kernels, scored rows in the step's table): each
    prompt token's score and alternatives as HF's on the CPU, within the devices' rounding."""
    directory = tiny_model_dirs["gqa"]
    source = resolve_model(str(directory), progress=False)
    prompts = random_prompts(source.spec.vocab_size, [20, 2, 9, 5], seed=26)
    config = SchedulerConfig(max_context=source.spec.max_context, max_step_tokens=8, block_size=4)
    events: list = []
    requests = prompt_requests(prompts)
    run_in_process(source, requests, config, device="cuda", events=events)
    assert_prompt_scores_match_hf(load_hf(directory), requests, events, tolerance=1e-3)


def row(logprobs: int) -> SampleRow:
    return SampleRow(temperature=0.0, top_k=0, top_p=1.0, seed=0, position=0, logprobs=logprobs)


def plan_of(rows: list[SampleRow], scored: list[ScoredTokens] = ()) -> StepPlan:
    """A plan whose only fields read here are its sampled rows and scored prompt tokens."""
    return StepPlan(sample=[True] * len(rows), sampling=rows, scored=list(scored))


def test_sample_table_hand_computed():
    """Probabilities 1/8, 2/8, 5/8 (logits log 1, log 2, log 5 + any constant); rows asking for 2, 0 and none."""
    logits = torch.tensor([[0.0, math.log(2), math.log(5)]] * 3) + 3.0
    plan = plan_of([row(2), row(0), row(-1)])
    width = logprob_width(plan)
    assert width == 2 + 2 * 2 and logprob_width(plan_of([row(-1)])) == 0
    tokens = torch.tensor([1, 2, 0])
    samples = unpack_samples(sample_table(logits, tokens, width), plan)
    assert samples.token_ids == [1, 2, 0]
    first, second, third = samples.logprobs
    assert first.logprob == pytest.approx(math.log(2 / 8))
    assert [i for i, _ in first.top] == [2, 1] and [v for _, v in first.top] == pytest.approx([math.log(5 / 8),
                                                                                                math.log(2 / 8)])
    assert second == TokenLogprobs(pytest.approx(math.log(5 / 8)), ()) and third is None


def test_sample_table_of_a_vocabulary_smaller_than_asked_pads_and_the_padding_is_dropped():
    logits = torch.tensor([[1.0, 2.0]])
    plan = plan_of([row(3)])
    table = sample_table(logits, torch.tensor([0]), logprob_width(plan))
    assert table.shape == (1, 8)
    (only,) = unpack_samples(table, plan).logprobs
    expected = torch.tensor([1.0, 2.0]).log_softmax(0)
    assert [i for i, _ in only.top] == [1, 0]
    assert [v for _, v in only.top] == pytest.approx([expected[1].item(), expected[0].item()])


def test_token_ids_without_logprobs_stay_an_int64_vector():
    samples = unpack_samples(torch.tensor([7, 9]), plan_of([row(-1), row(-1)]))
    assert samples.token_ids == [7, 9] and samples.logprobs is None
