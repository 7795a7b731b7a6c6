"""Overlapped steps of a one-rank replica: the scheduler's look-ahead plans by hand, and the engine with overlap on
giving the same tokens and finish reasons as without (greedy and seeded sampling, chunked prefill, stop tokens,
preemption, prefix caching), and HF's greedy tokens."""

from __future__ import annotations

import pytest
from engine_helpers import hf_greedy, load_hf, random_prompts

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.engine import Engine, build_runner, init_rank
from hexgen.engine.messages import GenerationRequest, SamplingParams, StepPlan
from hexgen.engine.scheduler import FED_BACK, Scheduler, SchedulerConfig
from hexgen.launch.spec import RankSpec, layout_of
from hexgen.plan import single_replica_plan


def request(rid: str, prompt_len: int, **params) -> GenerationRequest:
    return GenerationRequest(rid, tuple(range(10, 10 + prompt_len)), SamplingParams(**params))


def scheduler_of(**kwargs) -> Scheduler:
    return Scheduler(SchedulerConfig(**{"num_kv_blocks": 64, "block_size": 4, **kwargs}))


def entries(plan: StepPlan) -> list[tuple]:
    return list(zip(plan.seq_ids, plan.starts, plan.lengths, plan.sample, strict=True))


# ---------------------------------------------------------------- the scheduler's look-ahead, by hand

def test_lookahead_feeds_back_the_token_the_step_in_flight_samples():
    scheduler = scheduler_of()
    scheduler.add(request("a", 3, max_new_tokens=4))
    scheduler.add(request("b", 5, max_new_tokens=4))
    first = scheduler.schedule()
    assert entries(first) == [(0, 0, 3, True), (1, 0, 5, True)] and first.fed_back == []
    assert scheduler.schedule() is None  # without look-ahead, sequences in flight wait
    second = scheduler.schedule(lookahead=True)
    # each sequence's next token: position 3 (a) and 5 (b), from the first step's sampled rows 0 and 1
    assert entries(second) == [(0, 3, 1, True), (1, 5, 1, True)]
    assert second.token_ids == [FED_BACK, FED_BACK] and second.fed_back == [(0, 0), (1, 1)]
    assert [row.position for row in second.sampling] == [4, 6]  # the index of the token each samples
    assert second.block_tables == [[0], [1, 2]]  # b's 6th token (index 5) opens its second block
    events = scheduler.update(first, [7, 8])
    assert [(e.request_id, e.token_id) for e in events] == [("a", 7), ("b", 8)]
    third = scheduler.schedule(lookahead=True)  # the second step is in flight: look ahead of it
    assert entries(third) == [(0, 4, 1, True), (1, 6, 1, True)] and third.fed_back == [(0, 0), (1, 1)]
    scheduler.update(second, [9, 9])
    assert [seq.output_token_ids for seq in scheduler.running.values()] == [[7, 9], [8, 9]]


def test_lookahead_skips_a_token_that_cannot_be_needed_and_takes_known_ones():
    scheduler = scheduler_of(max_step_tokens=4)
    scheduler.add(request("a", 2, max_new_tokens=1))  # its first token is its last
    scheduler.add(request("b", 6, max_new_tokens=3))  # its prompt takes two steps of 4 tokens (2 go to a)
    first = scheduler.schedule()
    assert entries(first) == [(0, 0, 2, True), (1, 0, 2, False)]
    second = scheduler.schedule(lookahead=True)
    # a: nothing (the token in flight ends it by length); b: the rest of its prompt, known, behind its first chunk
    assert entries(second) == [(1, 2, 4, True)] and second.fed_back == []
    assert second.token_ids == [12, 13, 14, 15]
    scheduler.update(first, [7])
    third = scheduler.schedule(lookahead=True)
    assert entries(third) == [(1, 6, 1, True)] and third.fed_back == [(0, 0)]


def test_a_stop_token_voids_the_lookahead_step_and_its_blocks_wait_for_it():
    scheduler = scheduler_of()
    scheduler.add(request("a", 4, max_new_tokens=10, stop_token_ids=(99,)))
    first = scheduler.schedule()
    second = scheduler.schedule(lookahead=True)
    assert second.block_tables == [[0, 1]]  # the look-ahead token (index 4) took a second block
    events = scheduler.update(first, [99])
    assert [(e.request_id, e.token_id, e.finish_reason) for e in events] == [("a", 99, "stop")]
    assert scheduler.blocks.num_used == 2  # the second step still writes into them
    assert scheduler.schedule(lookahead=True) is None  # a finished sequence gets no more steps
    assert scheduler.update(second, [5]) == []  # its token is discarded
    assert scheduler.blocks.num_used == 0 and not scheduler.has_work


def test_abort_with_two_steps_in_flight_frees_blocks_when_both_are_back():
    scheduler = scheduler_of()
    scheduler.add(request("a", 4, max_new_tokens=10))
    first = scheduler.schedule()
    second = scheduler.schedule(lookahead=True)
    scheduler.abort("a")
    assert [(e.request_id, e.finish_reason) for e in scheduler.update(first, [5])] == [("a", "abort")]
    assert scheduler.blocks.num_used == 2
    assert scheduler.update(second, [6]) == [] and scheduler.blocks.num_used == 0


# ---------------------------------------------------------------- the engine, overlap on vs off

def run_engine(source, requests: list[GenerationRequest], config: SchedulerConfig, device: str = "cpu"
               ) -> tuple[dict[str, list[int]], dict[str, str], int]:
    """Step an in-process engine to the end: tokens and finish reason per request, and how many of the steps it
    ran fed back a token from the step before."""
    plan = single_replica_plan(source.spec, [1], None)
    spec = RankSpec(source, layout_of(plan.replicas[0], device), 0, device=device)
    runner = build_runner(spec, init_rank(spec), config)
    engine = Engine.create(runner, config, ())
    assert engine.overlap == (device == "cuda" if config.overlap_steps is None else config.overlap_steps)
    forward, fed_steps = runner.forward, []

    def counting_forward(step_plan, hidden):
        fed_steps.append(bool(step_plan.fed_back))
        return forward(step_plan, hidden)

    runner.forward = counting_forward
    for r in requests:
        engine.add(r)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    reasons: dict[str, str] = {}
    while engine.has_work:
        for event in engine.step():
            if event.token_id is not None:
                tokens[event.request_id].append(event.token_id)
            if event.finish_reason is not None:
                reasons[event.request_id] = event.finish_reason
    scheduler = engine.scheduler
    assert scheduler.blocks.num_used == 0 and not scheduler.running  # every block came back
    return tokens, reasons, sum(fed_steps)


def mixed_requests(vocab_size: int, stops: dict[str, int] | None = None) -> list[GenerationRequest]:
    """Ten requests of different lengths, budgets and sampling; `stops` adds a stop token to some."""
    prompts = random_prompts(vocab_size, [9, 3, 14, 6, 11, 5, 3, 17, 8, 4], seed=11)
    requests = []
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        sampled = dict(temperature=0.8, top_p=0.9, seed=100 + i) if i % 3 == 1 else {}
        stop = (stops[rid],) if stops and rid in stops else ()
        requests.append(GenerationRequest(rid, tuple(prompt), SamplingParams(
            max_new_tokens=3 + 2 * i, ignore_eos=True, stop_token_ids=stop, **sampled)))
    return requests


SETTINGS = [
    dict(),  # room for everything
    dict(max_step_tokens=7, max_running_seqs=6),  # chunked prefill, sequences joining while others run
    dict(block_size=4, num_kv_blocks=14, max_running_seqs=8),  # preemption and recomputation
    dict(prefix_caching=True, block_size=2),  # cached prefixes registered from fed-back tokens
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_overlapped_engine_matches_the_plain_one(setting, tiny_model_dirs):
    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    base = SchedulerConfig(max_context=source.spec.max_context, **setting)
    plain_tokens, _, plain_fed = run_engine(source, mixed_requests(source.spec.vocab_size), base)
    # stop three greedy requests and one sampled one at the token they produced third
    stops = {rid: plain_tokens[rid][2] for rid in ("r2", "r4", "r7", "r9")}
    requests = mixed_requests(source.spec.vocab_size, stops)
    plain = run_engine(source, requests, base)
    overlapped = run_engine(source, requests, SchedulerConfig(**{**base.__dict__, "overlap_steps": True}))
    assert overlapped[:2] == plain[:2]
    assert {plain[1][rid] for rid in stops} == {"stop"}  # the stop tokens did end them early
    assert plain_fed == plain[2] == 0 and overlapped[2] > 5  # only the overlapped run looked ahead


def test_overlapped_engine_matches_hf(tiny_model_dirs):
    directory = tiny_model_dirs["tied"]
    model = load_hf(directory)
    source = resolve_model(str(directory), progress=False)
    prompts = random_prompts(model.config.vocab_size, [7, 12, 4], seed=5)
    requests = [GenerationRequest(f"r{i}", tuple(p), SamplingParams(max_new_tokens=9, ignore_eos=True))
                for i, p in enumerate(prompts)]
    config = SchedulerConfig(max_context=source.spec.max_context, overlap_steps=True)
    tokens, reasons, fed = run_engine(source, requests, config)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_greedy(model, prompt, 9)[0]
    assert set(reasons.values()) == {"length"} and fed >= 7


@pytest.mark.gpu
@pytest.mark.parametrize("setting", SETTINGS)
def test_overlapped_steps_on_cuda_match_steps_in_series(setting, tiny_model_dirs):
    """On CUDA (graphs, Triton kernels) a one-GPU engine overlaps its steps by default: the same tokens and finish
    reasons as with its steps in series, and the CPU's greedy tokens; with chunked prefills, preemptions (blocks
    of a step in flight) and cached prefixes too."""
    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    base = SchedulerConfig(**{"max_context": source.spec.max_context, "max_running_seqs": 8, **setting})
    cpu_tokens = run_engine(source, mixed_requests(source.spec.vocab_size), base)[0]
    stops = {rid: cpu_tokens[rid][2] for rid in ("r2", "r4", "r7", "r9")}
    requests = mixed_requests(source.spec.vocab_size, stops)
    overlapped = run_engine(source, requests, base, device="cuda")
    in_series = run_engine(source, requests, SchedulerConfig(**{**base.__dict__, "overlap_steps": False}), "cuda")
    assert overlapped[:2] == in_series[:2]
    assert overlapped[2] > 5 and in_series[2] == 0
    cpu = run_engine(source, requests, base)  # greedy ones: sampled draws may part on the devices' rounding
    greedy = [r.request_id for r in requests if r.params.temperature == 0]
    assert [overlapped[0][rid] for rid in greedy] == [cpu[0][rid] for rid in greedy]


@pytest.mark.gpu
@pytest.mark.parametrize("sampled", [False, True, "logprobs"])
def test_launching_a_step_on_cuda_never_waits_for_the_gpu(sampled, tiny_model_dirs):
    """Queueing a look-ahead decode step (metadata copies, graph replay, logits, sampling, the tokens' copy to the
    host, with "logprobs" the table of log-probabilities instead) runs no operation that makes the host wait for
    the device (torch's sync debug mode raises on one, e.g. a boolean-mask index or .item()); else the overlap
    would be lost."""
    import torch

    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    plan = single_replica_plan(source.spec, [1], None)
    spec = RankSpec(source, layout_of(plan.replicas[0], "cuda"), 0, device="cuda")
    config = SchedulerConfig(max_context=source.spec.max_context)
    engine = Engine.create(build_runner(spec, init_rank(spec), config), config, ())
    params = dict(temperature=0.7, top_k=20, top_p=0.9, seed=3) if sampled else {}
    if sampled == "logprobs":
        params["logprobs"] = 3
    for i, prompt in enumerate(random_prompts(source.spec.vocab_size, [6, 9, 4], seed=8)):
        engine.add(GenerationRequest(f"r{i}", tuple(prompt), SamplingParams(max_new_tokens=12, **params)))
    for _ in range(3):  # prefill, then decodes with a look-ahead step in flight
        engine.step()
    step_plan = engine.scheduler.schedule(lookahead=True)
    assert step_plan is not None and len(step_plan.fed_back) == 3
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = engine._launch(step_plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engine.in_flight.append((step_plan, tokens))
    while engine.has_work:
        engine.step()
