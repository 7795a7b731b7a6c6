"""Request validation (protocol.py, Coordinator.prepare), 429 accounting, dispatch and failover of the Coordinator,
against hand-computed expectations; replicas are in-process fakes, so no process starts."""

from __future__ import annotations

import asyncio

import pytest
from fake_replicas import VOCAB, FakeReplica, LetterTokenizer, make_coordinator
from pydantic import ValidationError

from hexgen.engine.messages import TokenEvent, TokenLogprobs
from hexgen.server.app import _collect as collect_answer
from hexgen.server.coordinator import merge_choices, served_context
from hexgen.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from hexgen.server.replica_client import Rejected, ReplicaDown
from hexgen.server.responses import ResponseShape, chat_logprobs, completion_logprobs


def tokens(*ids: int, finish: str | None = "length") -> list:
    """Queue items (made per request id) of tokens ids; the last one carries `finish`."""

    def event(t: int, last: bool):
        return lambda rid: TokenEvent(rid, t, finish if last else None)

    return [event(t, i == len(ids) - 1) for i, t in enumerate(ids)]


def fields(**kwargs) -> CompletionRequest:
    return CompletionRequest(model="tiny", prompt="x", **kwargs)


# ---- protocol: what the request models reject ----


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.01}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"logit_bias": {"five": 1.0}}, "logit_bias"),
        ({"logit_bias": {"-5": 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"best_of": 3}, "best_of"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"suffix": "end"}, None),
        ({"functions": []}, "functions"),
        ({"prompt": [[1, 2], "two"]}, "prompt"),
        ({"prompt": [[1, "two"]]}, "prompt"),
    ],
)
def test_completion_request_rejects(extra, param):
    body = {"model": "tiny", "prompt": "hi", **extra}
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    if param is not None:
        assert param in {str(loc) for err in info.value.errors() for loc in err["loc"]}


def test_completion_request_accepts_openai_defaults_and_edges():
    body = CompletionRequest.model_validate(
        {
            "model": "tiny",
            "prompt": ["only one"],
            "top_p": 1.0,
            "temperature": 0,
            "n": 1,
            "stop": "\n",
            "stream": True,
            "stream_options": {"include_usage": True},
            "best_of": 1,
            "user": "u",
        }
    )
    assert body.prompts == ["only one"]
    assert body.stop_strings == ("\n",) and body.include_usage
    assert CompletionRequest(model="tiny", prompt=[1, 2, 3]).prompts == [[1, 2, 3]]
    assert CompletionRequest(model="tiny", prompt=["a", "b"]).prompts == ["a", "b"]
    assert CompletionRequest(model="tiny", prompt=[[1, 2], [3]]).prompts == [[1, 2], [3]]
    assert CompletionRequest(model="tiny", prompt=[]).prompts == [[]]  # empty: prepare answers 400
    assert CompletionRequest(model="tiny", prompt="x").stop_strings == ()


@pytest.mark.parametrize(
    "body",
    [
        {"model": "tiny", "messages": []},
        {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]},
        {"model": "tiny", "messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": False, "top_logprobs": 2},
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
    ],
)
def test_chat_request_rejects(body):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_chat_request_messages_and_token_limit():
    body = ChatCompletionRequest.model_validate(
        {
            "model": "tiny",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_tokens": 9,
            "max_completion_tokens": 3,
        }
    )
    assert body.template_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert body.token_limit == 3
    assert ChatCompletionRequest(model="t", messages=[{"role": "user", "content": "x"}], max_tokens=9).token_limit == 9


def test_api_error_body_is_openai_shaped():
    err = APIError(429, "slow down", type_="rate_limit_exceeded", code="c", headers={"Retry-After": "1"})
    assert err.body() == {"error": {"message": "slow down", "type": "rate_limit_exceeded", "param": None, "code": "c"}}
    assert err.headers == {"Retry-After": "1"}


# ---- Coordinator.prepare: lengths against a context of 10 tokens, vocabulary of 50 ----


@pytest.mark.parametrize(
    "prompt, max_tokens, status_param_code",
    [
        ([], 1, ("prompt", None)),
        ([1, VOCAB], 1, ("prompt", None)),
        ([1, -1], 1, ("prompt", None)),
        (list(range(10)), 1, ("prompt", "context_length_exceeded")),  # 10 prompt tokens leave no room
        ([1, 2, 3, 4], 0, ("max_tokens", None)),
        ([1, 2, 3, 4], -5, ("max_tokens", None)),
        ([1, 2, 3, 4], 7, ("max_tokens", "context_length_exceeded")),  # 4 + 7 = 11 > 10
    ],
)
def test_prepare_rejects(prompt, max_tokens, status_param_code):
    coordinator = make_coordinator([FakeReplica(0)])
    with pytest.raises(APIError) as info:
        coordinator.prepare(prompt, max_tokens, fields())
    assert info.value.status == 400
    assert (info.value.param, info.value.code) == status_param_code
    if info.value.code == "context_length_exceeded" and info.value.param == "max_tokens":
        assert "at most 6" in info.value.message  # 10 - 4 tokens of prompt


def test_prepare_builds_the_engine_request():
    coordinator = make_coordinator([FakeReplica(0)])
    request = coordinator.prepare([1, 2, 3], 7, fields(temperature=0.5, top_p=0.9, top_k=3, seed=11, ignore_eos=True))
    assert request.prompt_token_ids == (1, 2, 3)  # 3 + 7 = 10 fits exactly
    p = request.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.ignore_eos) == (7, 0.5, 0.9, 3, 11, True)
    # no max_tokens: OpenAI's 16, capped by the room left in the context (10 - 4 = 6)
    assert coordinator.prepare([1, 2, 3, 4], None, fields()).params.max_new_tokens == 6
    assert make_coordinator([FakeReplica(0)], max_context=100).prepare([1], None, fields()).params.max_new_tokens == 16
    assert request.request_id != coordinator.prepare([1, 2, 3], 7, fields()).request_id


def test_prepare_takes_top_p_zero_as_only_the_most_likely_token():
    """top_k 1 (top_p 1, which the engine needs above 0): the engine's greedy path, even with a seed."""
    coordinator = make_coordinator([FakeReplica(0)])
    p = coordinator.prepare([1, 2, 3], 2, fields(temperature=1.5, top_p=0, top_k=7, seed=5)).params
    assert (p.top_k, p.top_p, p.temperature, p.seed, p.is_greedy) == (1, 1.0, 1.5, 5, True)


def test_prepare_passes_penalties_and_biases_and_checks_bias_ids_against_the_vocabulary():
    coordinator = make_coordinator([FakeReplica(0)])
    body = fields(presence_penalty=-0.5, frequency_penalty=2.0, logit_bias={"49": -100, "7": 3.5})
    p = coordinator.prepare([1], 2, body).params
    assert (p.presence_penalty, p.frequency_penalty, p.logit_bias) == (-0.5, 2.0, ((7, 3.5), (49, -100.0)))
    assert p.has_penalties and not coordinator.prepare([1], 2, fields(logit_bias={"3": 1})).params.has_penalties
    with pytest.raises(APIError) as info:
        coordinator.prepare([1], 2, fields(logit_bias={"50": 1.0}))  # VOCAB = 50 tokens: ids 0..49
    assert (info.value.status, info.value.param) == (400, "logit_bias") and "[0, 50)" in info.value.message


def test_token_ids_are_checked_against_the_models_vocabulary_not_the_tokenizers():
    """A checkpoint whose embedding has fewer rows (40) than its tokenizer has tokens (VOCAB = 50): ids 40..49 would
    index past the embedding on a replica; refused here with a 400 that says why."""
    import dataclasses

    coordinator = make_coordinator([FakeReplica(0)])
    coordinator.config = dataclasses.replace(coordinator.config, vocab_size=40)
    assert coordinator.prepare([0, 39], 2, fields()).prompt_token_ids == (0, 39)
    for prompt in ([1, 45, 2], [-1], [40]):
        with pytest.raises(APIError) as info:
            coordinator.prepare(prompt, 2, fields())
        assert (info.value.status, info.value.param) == (400, "prompt")
        assert f"must be in [0, 40) (the model's vocabulary), got {prompt[1 if len(prompt) > 1 else 0]}" in (
            info.value.message)
        assert "the server's tokenizer has 50 tokens, more than the model" in info.value.message
    with pytest.raises(APIError) as info:
        coordinator.prepare([1], 2, fields(logit_bias={"45": 1.0}))
    assert (info.value.status, info.value.param) == (400, "logit_bias") and "[0, 40)" in info.value.message


@pytest.mark.parametrize(("body", "expected"), [
    (CompletionRequest(model="tiny", prompt="x"), None),
    (CompletionRequest(model="tiny", prompt="x", logprobs=0), 0),
    (CompletionRequest(model="tiny", prompt="x", logprobs=5), 5),
    (CompletionRequest(model="tiny", prompt="x", logprobs=5, echo=True), 5),
    (ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}]), None),
    (ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], logprobs=False), None),
    (ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], logprobs=True), 0),
    (ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], logprobs=True,
                           top_logprobs=20), 20),
])
def test_prepare_asks_the_engine_for_the_logprobs_each_endpoint_names(body, expected):
    params = make_coordinator([FakeReplica(0)]).prepare([1], 2, body).params
    assert params.logprobs == expected
    # the prompt's scores only for an echoed completion with logprobs
    assert params.prompt_logprobs == (expected if getattr(body, "echo", False) else None)
    echoed = CompletionRequest(model="tiny", prompt="x", echo=True)
    assert make_coordinator([FakeReplica(0)]).prepare([1], 2, echoed).params.prompt_logprobs is None


def test_the_first_delta_carries_the_prompts_scores_the_first_token_unscored():
    scores = (TokenLogprobs(-1.5), TokenLogprobs(-2.5))

    def first(rid):
        return TokenEvent(rid, 0, None, TokenLogprobs(-0.5), scores)

    coordinator = make_coordinator([FakeReplica(0, [[first, *logprob_tokens(1)]])])
    request = coordinator.prepare([7, 8, 9], 2, fields(logprobs=0, echo=True))
    deltas = asyncio.run(_collect(coordinator, request))
    assert deltas[0].prompt_logprobs == [(7, None), (8, scores[0]), (9, scores[1])]
    assert all(d.prompt_logprobs == [] for d in deltas[1:])
    body, end = completion_logprobs(deltas[0].prompt_logprobs + deltas[0].logprobs, LetterSpeller(), 0)
    assert body["token_logprobs"] == [None, -1.5, -2.5, -0.5] and body["top_logprobs"][0] is None
    assert body["text_offset"] == [0, 1, 2, 3] and end == 4


def test_admit_counts_requests_of_replicas_that_are_up():
    replicas = [FakeReplica(0), FakeReplica(1), FakeReplica(2)]
    replicas[0].state.outstanding, replicas[1].state.outstanding, replicas[2].state.outstanding = 2, 1, 5
    replicas[2].state.is_up = False
    make_coordinator(replicas, max_outstanding=4).admit()  # 2 + 1 < 4
    with pytest.raises(APIError) as info:
        make_coordinator(replicas, max_outstanding=3).admit()
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
    assert info.value.body()["error"]["type"] == "rate_limit_exceeded"


def test_admit_counts_every_choice_of_a_request():
    replicas = [FakeReplica(0), FakeReplica(1)]
    replicas[0].state.outstanding, replicas[1].state.outstanding = 2, 1
    coordinator = make_coordinator(replicas, max_outstanding=6)
    coordinator.admit(2)  # 3 + 2 <= 6
    with pytest.raises(APIError) as info:
        coordinator.admit(2)  # 3 on replicas + 2 admitted, not yet submitted + 2 > 6
    assert info.value.status == 429


def test_admitted_sequences_count_until_they_reach_a_replica():
    """A burst cannot slip past the limit between admission and submission: admitted sequences count until each
    is on a replica (where it counts as outstanding) or its request ends."""
    replicas = [FakeReplica(0)]
    coordinator = make_coordinator(replicas, max_outstanding=3)
    first, second = coordinator.admit(2), coordinator.admit(1)
    with pytest.raises(APIError):
        coordinator.admit(1)  # nothing submitted yet: 3 admitted
    first.reached_replica()
    replicas[0].state.outstanding += 1  # what submit does
    with pytest.raises(APIError):
        coordinator.admit(1)  # 1 outstanding + 2 admitted
    second.close()
    third = coordinator.admit(1)  # 1 outstanding + 1 admitted + 1
    first.close()  # its other sequence never reached a replica
    third.close()
    assert coordinator.admitted == 0
    coordinator.admit(2)


def test_a_stream_moves_its_admission_to_its_replica():
    replica = FakeReplica(0, [tokens(5, 6)])
    coordinator = make_coordinator([replica], max_outstanding=2)
    admission = coordinator.admit(1)

    async def go() -> tuple[int, int]:
        stream = coordinator.stream_text(coordinator.prepare([1], 2, fields()), (), False, admission)
        await anext(stream)
        seen = coordinator.admitted, replica.state.outstanding
        await stream.aclose()
        return seen

    assert asyncio.run(go()) == (0, 1)  # counted once: on its replica, no longer as admitted
    admission.close()
    assert coordinator.admitted == 0 and replica.state.outstanding == 0


def test_choices_take_consecutive_seeds_and_their_own_ids():
    coordinator = make_coordinator([FakeReplica(0)], max_context=100, max_outstanding=4)
    seeded = coordinator.prepare([1, 2], 5, fields(seed=40, temperature=0.5))
    many = coordinator.choices(seeded, 3)
    assert [r.params.seed for r in many] == [40, 41, 42]
    assert len({r.request_id for r in many}) == 3 and {r.prompt_token_ids for r in many} == {(1, 2)}
    assert {(r.params.max_new_tokens, r.params.temperature) for r in many} == {(5, 0.5)}
    assert [r.params.seed for r in coordinator.choices(coordinator.prepare([1], 5, fields()), 2)] == [None, None]
    assert coordinator.choices(seeded, 1) == [seeded]
    with pytest.raises(APIError) as info:
        coordinator.choices(seeded, 5)  # more than the 4 requests the server keeps in flight
    assert info.value.status == 400 and info.value.param == "n"


def _merged(coordinator, requests, restartable=False) -> list:
    async def go():
        streams = [coordinator.stream_text(r, (), restartable) for r in requests]
        return [(i, d.text, d.finish_reason) async for i, d in merge_choices(streams)]

    return asyncio.run(go())


def test_merged_choices_carry_their_index():
    replica = FakeReplica(0, [tokens(0, 1), tokens(2, 3, 4)])
    coordinator = make_coordinator([replica], max_context=100)
    requests = coordinator.choices(coordinator.prepare([1], 3, fields(seed=1)), 2)
    merged = _merged(coordinator, requests)
    assert "".join(t for i, t, _ in merged if i == 0) == "ab" and "".join(t for i, t, _ in merged if i == 1) == "cde"
    assert [(i, f) for i, _, f in merged if f] in ([(0, "length"), (1, "length")], [(1, "length"), (0, "length")])
    assert sorted(replica.released) == sorted((r.request_id, False) for r in requests)


def test_a_choice_cancelled_from_within_fails_the_merge_rather_than_leave_it_waiting():
    """A choice's stream ending in a CancelledError of its own (not the merge closing: once a closed channel did
    that) is an error of the request, where the merge used to wait for that choice for ever."""

    async def cancelled():
        raise asyncio.CancelledError
        yield  # an async generator

    async def fine():
        yield "x"

    async def scenario():
        with pytest.raises(RuntimeError, match="choice 0 was cancelled from within"):
            async for _ in merge_choices([cancelled(), fine()]):
                pass

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_a_failing_choice_fails_the_request_and_aborts_the_others():
    # choice 0 produces a token, then its replica goes down (a stream cannot restart); choice 1 is still generating
    replica = FakeReplica(0, [[*tokens(4, finish=None), ReplicaDown("gone")], tokens(5, 6, finish=None)])
    coordinator = make_coordinator([replica], max_context=100)
    requests = coordinator.choices(coordinator.prepare([1], 9, fields(seed=1)), 2)

    async def go():
        streams = [coordinator.stream_text(r, (), False) for r in requests]
        with pytest.raises(APIError) as info:
            async for _ in merge_choices(streams):
                pass
        return info.value, list(replica.released)  # as the error reaches the caller, not once the loop ends

    error, released = asyncio.run(go())
    assert error.status == 503 and "gone" in error.message
    assert sorted(released) == sorted((r.request_id, True) for r in requests)  # both aborted


# ---- dispatch through the shared policies, failover, text ----


async def _collect(coordinator, request, restartable=True, stop=()):
    return [d async for d in coordinator.stream_text(request, stop, restartable)]


def _dispatch(policy: str, replicas, n: int) -> list[int]:
    """Submit n requests that stay in flight; the index of the replica each went to."""
    coordinator = make_coordinator(replicas, policy)

    async def go():
        chosen, pending = [], []
        for _ in range(n):
            before = [len(r.submitted) for r in replicas]
            events = coordinator.events(coordinator.prepare([1], 1, fields()), restartable=lambda: True)
            pending.append(asyncio.ensure_future(anext(events)))
            await asyncio.sleep(0)
            chosen.append(next(i for i, r in enumerate(replicas) if len(r.submitted) > before[i]))
        for task in pending:
            task.cancel()
        return chosen

    return asyncio.run(go())


def test_dispatch_policies_as_the_simulator_defines_them():
    # round-robin: each replica in turn, whatever its load
    assert _dispatch("round-robin", [FakeReplica(0), FakeReplica(1), FakeReplica(2)], 5) == [0, 1, 2, 0, 1]
    # least-outstanding: requests stay in flight, so they spread; ties go to the lowest index
    assert _dispatch("least-outstanding", [FakeReplica(0), FakeReplica(1)], 4) == [0, 1, 0, 1]
    # capacity-weighted, weights 1 and 4: (out + 1) / w is 1 vs .25, .5, .75, then 1 vs 1 (tie -> 0), then 2 vs 1.25
    weighted = [FakeReplica(0, weight=1.0), FakeReplica(1, weight=4.0)]
    assert _dispatch("capacity-weighted", weighted, 6) == [1, 1, 1, 0, 1, 1]


def test_down_replica_is_skipped_and_all_down_is_503():
    replicas = [FakeReplica(0), FakeReplica(1, [tokens(2, 3)])]
    replicas[0].state.is_up = False
    coordinator = make_coordinator(replicas, "round-robin")
    deltas = asyncio.run(_collect(coordinator, coordinator.prepare([1], 2, fields())))
    assert "".join(d.text for d in deltas) == "cd" and deltas[-1].finish_reason == "length"
    assert replicas[0].submitted == []
    replicas[1].state.is_up = False
    with pytest.raises(APIError) as info:
        asyncio.run(_collect(coordinator, coordinator.prepare([1], 2, fields())))
    assert info.value.status == 503


def test_a_request_goes_only_to_replicas_whose_kv_pool_holds_it():
    small, large = FakeReplica(0, [tokens(2)] * 3), FakeReplica(1, [tokens(2)] * 3)
    small.state.max_context, large.state.max_context = 6, 9  # tokens a sequence, as their drivers said
    coordinator = make_coordinator([small, large], "round-robin", max_context=10)
    assert served_context(10, [small, large]) == 9 and served_context(8, [small, large]) == 8

    def send(prompt_len: int, max_tokens: int) -> None:
        asyncio.run(_collect(coordinator, coordinator.prepare([1] * prompt_len, max_tokens, fields())))

    send(4, 2)  # 6 tokens: either; round-robin's turn is replica 0's
    send(4, 3)  # 7 tokens: only replica 1 holds it, though it is replica 0's turn ...
    assert (len(small.submitted), len(large.submitted)) == (1, 1)
    send(4, 2)  # ... and the turns go on from there
    assert (len(small.submitted), len(large.submitted)) == (2, 1)
    with pytest.raises(APIError) as info:  # 10 tokens: within the server's context, beyond every pool
        send(4, 6)
    assert (info.value.status, info.value.param, info.value.code) == (400, "max_tokens", "context_length_exceeded")
    assert "needs 10 tokens (4 in the prompt, 6 to generate)" in info.value.message
    assert "hold at most 9 tokens" in info.value.message and "max_tokens to at most 5" in info.value.message
    large.state.is_up = False  # the one that holds 7 tokens is down: a 503, the request itself is fine
    with pytest.raises(APIError) as info:
        send(6, 1)
    assert info.value.status == 503 and "hold this request's 7 tokens are down" in info.value.message
    small.state.max_context = 5  # the largest pool, replica 1's, is down; a prompt longer than any pool: a 400
    with pytest.raises(APIError) as info:
        send(9, 1)
    assert (info.value.status, info.value.param) == (400, "prompt")
    assert "hold at most 5 tokens" in info.value.message and "shorter than 5 tokens" in info.value.message
    small.state.is_up = False
    with pytest.raises(APIError) as info:
        send(2, 1)
    assert info.value.status == 503


def test_a_chat_request_without_a_limit_fills_the_context_or_its_replicas_pool():
    """OpenAI's defaults: completions 16 tokens, chat the rest of the context. A chat request that names no limit
    may go to a replica whose pool is shorter than the context; it then generates until that pool is full."""
    small, large = FakeReplica(0, [tokens(2)] * 3), FakeReplica(1, [tokens(2)] * 3)
    small.state.max_context, large.state.max_context = 6, 9
    coordinator = make_coordinator([small, large], "round-robin", max_context=9)  # served_context: the largest pool
    chat = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}])
    open_ended = coordinator.prepare([1] * 4, chat.token_limit, chat)
    assert (open_ended.params.max_new_tokens, open_ended.open_ended) == (5, True)  # 9 - 4
    named = coordinator.prepare([1] * 4, 5, chat)
    assert (named.params.max_new_tokens, named.open_ended) == (5, False)
    completion = coordinator.prepare([1] * 4, None, fields())
    assert (completion.params.max_new_tokens, completion.open_ended) == (5, False)  # min(16, 9 - 4)
    assert make_coordinator([FakeReplica(0)], max_context=100).prepare([1] * 4, None, chat).params.max_new_tokens == 96
    for request in (open_ended, open_ended, named):
        asyncio.run(_collect(coordinator, request))
    # round-robin: the open-ended request on replica 0 (6 tokens a sequence: 2 to generate), then replica 1 (5);
    # the one that named 5 tokens fits only replica 1 although it is replica 0's turn
    assert (small.max_new_tokens, large.max_new_tokens) == ([2], [5, 5])
    small.state.max_context = 4  # the prompt alone fills replica 0's pool: no room for a token there
    asyncio.run(_collect(coordinator, open_ended))
    assert (small.max_new_tokens, large.max_new_tokens) == ([2], [5, 5, 5])


def test_start_up_names_the_replicas_whose_pools_are_short(capsys):
    from hexgen.server.serve import note_small_pools

    replicas = [FakeReplica(i) for i in range(3)]
    for replica, holds in zip(replicas, (768, 4096, 2048), strict=True):
        replica.state.max_context = holds
    note_small_pools(replicas, 4096)
    assert capsys.readouterr().err.splitlines() == [
        f"hexgen serve: replica {i}'s KV cache holds {n} tokens a sequence, less than the context of 4096: longer "
        "requests go to replicas that hold them (--memory-gb sets the room for it)" for i, n in ((0, 768), (2, 2048))]
    replicas[1].state.max_context = 1024  # now replica 2's pool is the largest: what it cannot hold, none can
    note_small_pools(replicas, 4096)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[2].endswith("longer requests get a 400 (--memory-gb sets the room for it)")


def test_failover_before_first_token_resends_to_another_replica():
    replicas = [FakeReplica(0, [[ReplicaDown("rank 2 exited with code -9")]]), FakeReplica(1, [tokens(7, 8, 9)])]
    coordinator = make_coordinator(replicas, "round-robin")
    request = coordinator.prepare([1, 2], 3, fields())
    deltas = asyncio.run(_collect(coordinator, request, restartable=False))  # a stream: nothing was sent yet
    assert "".join(d.text for d in deltas) == "hij"
    assert [d.completion_tokens for d in deltas] == [1, 2, 3]
    assert replicas[0].submitted == replicas[1].submitted == [request.request_id]
    assert coordinator.metrics.failovers._value.get() == 1
    assert replicas[1].released == [(request.request_id, False)]  # finished: nothing to abort


def test_failover_after_tokens_restarts_a_whole_answer_or_fails_a_stream():
    def scripts():
        return [FakeReplica(0, [[*tokens(4, 5, finish=None)[:2], ReplicaDown("gone")]]), FakeReplica(1, [tokens(7, 8)])]

    replicas = scripts()
    coordinator = make_coordinator(replicas, "round-robin")
    request = coordinator.prepare([1], 2, fields())
    text, finish, _, count = asyncio.run(collect_answer(coordinator.stream_text(request, (), restartable=True)))
    # what replica 0 produced ("ef") is dropped; the answer is replica 1's alone, its tokens counted from 1 again
    assert (text, finish, count) == ("hi", "length", 2)
    assert replicas[0].released == [(request.request_id, True)] and replicas[1].submitted == [request.request_id]
    replicas = scripts()
    coordinator = make_coordinator(replicas, "round-robin")
    with pytest.raises(APIError) as info:
        asyncio.run(_collect(coordinator, coordinator.prepare([1], 2, fields()), restartable=False))
    assert info.value.status == 503 and "gone" in info.value.message
    assert replicas[1].submitted == []


def test_a_stream_whose_text_was_all_held_back_is_resent_unseen():
    """Tokens came, but the stream had shown none of their text (held back while it could begin a stop string):
    the client has seen nothing, so the request goes to another replica as if no token had come."""
    replicas = [FakeReplica(0, [[*tokens(4, 5, finish=None)[:2], ReplicaDown("gone")]]),
                FakeReplica(1, [tokens(7, 8, 9)])]
    coordinator = make_coordinator(replicas, "round-robin")
    request = coordinator.prepare([1], 3, fields())
    deltas = asyncio.run(_collect(coordinator, request, stop=("efx",), restartable=False))  # "ef" may begin "efx"
    assert [(d.text, d.restart) for d in deltas] == [("hij", False)]  # held back to the end: no restart shown
    assert deltas[-1].finish_reason == "length" and replicas[1].submitted == [request.request_id]
    assert coordinator.metrics.failovers._value.get() == 1


def test_rejected_by_the_replica_is_400_and_stop_string_cuts_text():
    coordinator = make_coordinator([FakeReplica(0, [[Rejected("prompt too long")]])])
    with pytest.raises(APIError) as info:
        asyncio.run(_collect(coordinator, coordinator.prepare([1], 2, fields())))
    assert info.value.status == 400 and info.value.message == "prompt too long"
    replica = FakeReplica(0, [tokens(0, 1, 2, 3, 4)])  # "abcde" with stop "cd"
    coordinator = make_coordinator([replica])
    request = coordinator.prepare([1], 5, fields())
    deltas = asyncio.run(_collect(coordinator, request, stop=("cd",)))
    assert "".join(d.text for d in deltas) == "ab" and deltas[-1].finish_reason == "stop"
    assert replica.released == [(request.request_id, True)]  # stopped early: aborted on the replica


# ---- log-probabilities: which delta carries which token's, and their OpenAI shapes ----


def logprob_tokens(*ids: int, finish: str | None = "length") -> list:
    """Like `tokens`, each event with log-probability -(its id) and one alternative (id + 1, -(id + 1))."""

    def event(t: int, last: bool):
        return lambda rid: TokenEvent(rid, t, finish if last else None, TokenLogprobs(-float(t), ((t + 1, -t - 1.0),)))

    return [event(t, i == len(ids) - 1) for i, t in enumerate(ids)]


def test_each_delta_carries_the_logprobs_of_the_tokens_it_adds_and_a_restart_drops_them():
    # "abcde" with stop "cd": the last character is held back while it may begin the stop string, so "a" is shown
    # once b arrives, with a's and b's log-probabilities; "b" with c; d completes the stop string and ends the
    # answer with no more text, carrying d's
    coordinator = make_coordinator([FakeReplica(0, [logprob_tokens(0, 1, 2, 3, 4)])])
    deltas = asyncio.run(_collect(coordinator, coordinator.prepare([1], 5, fields(logprobs=1)), stop=("cd",)))
    assert [(d.text, [t for t, _ in d.logprobs]) for d in deltas] == [("a", [0, 1]), ("b", [2]), ("", [3])]
    assert deltas[-1].logprobs[0][1] == TokenLogprobs(-3.0, ((4, -4.0),))
    replicas = [FakeReplica(0, [[*logprob_tokens(4, 5, finish=None)[:2], ReplicaDown("gone")]]),
                FakeReplica(1, [logprob_tokens(7, 8)])]
    coordinator = make_coordinator(replicas, "round-robin")
    request = coordinator.prepare([1], 2, fields(logprobs=1))
    _, _, logprobs, _ = asyncio.run(collect_answer(coordinator.stream_text(request, (), restartable=True)))
    assert [t for t, _ in logprobs] == [7, 8]  # replica 0's tokens went with its text


class LetterSpeller(LetterTokenizer):
    """Token i is the letter chr(97 + i % 26), and token 49 the two characters 'é!' (3 bytes)."""

    def token_text(self, token_id: int) -> str:
        return "é!" if token_id == 49 else self.decode([token_id])

    def token_bytes(self, token_id: int) -> bytes | None:
        return self.token_text(token_id).encode()


def test_completion_logprobs_hand_computed():
    items = [(0, TokenLogprobs(-0.5, ((1, -0.25), (0, -0.5)))), (49, TokenLogprobs(-2.0, ((1, -0.1),)))]
    body, end = completion_logprobs(items, LetterSpeller(), text_offset=4)
    assert body == {
        "tokens": ["a", "é!"],
        "token_logprobs": [-0.5, -2.0],
        # the N most likely, and the sampled token where it is not among them
        "top_logprobs": [{"b": -0.25, "a": -0.5}, {"b": -0.1, "é!": -2.0}],
        "text_offset": [4, 5],
    }
    assert end == 7


def test_chat_logprobs_hand_computed():
    items = [(49, TokenLogprobs(-2.0, ((1, -0.1),)))]
    assert chat_logprobs(items, LetterSpeller()) == {
        "content": [{"token": "é!", "logprob": -2.0, "bytes": [0xC3, 0xA9, 0x21],
                     "top_logprobs": [{"token": "b", "logprob": -0.1, "bytes": [0x62]}]}],
        "refusal": None,
    }


def test_streamed_completion_chunks_continue_each_choices_text_offsets():
    shape = ResponseShape(chat=False, model="tiny", prompt_tokens=1, speller=LetterSpeller())
    first = shape.chunk("a", None, index=0, logprobs=[(0, TokenLogprobs(-1.0))])
    other = shape.chunk("é!", None, index=1, logprobs=[(49, TokenLogprobs(-1.0))])
    second = shape.chunk("bc", "length", index=0, logprobs=[(1, TokenLogprobs(-1.0)), (2, TokenLogprobs(-1.0))])
    assert first["choices"][0]["logprobs"]["text_offset"] == [0]
    assert other["choices"][0]["logprobs"]["text_offset"] == [0]
    assert second["choices"][0]["logprobs"]["text_offset"] == [1, 2]
    plain = ResponseShape(chat=False, model="tiny", prompt_tokens=1)
    assert plain.chunk("a", None, logprobs=[])["choices"][0]["logprobs"] is None
