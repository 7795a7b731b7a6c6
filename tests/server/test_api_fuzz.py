"""Bad input never crashes the server: random bodies for both OpenAI endpoints (valid requests with fields replaced
by values of any JSON type or none, fields added, bodies that are not objects or not JSON at all), sent to the real
FastAPI app over a Coordinator with in-process replicas and SmolLM2's real tokenizer and chat template. Every
answer is a 200 with choices (the whole stream, for streamed ones) or a 4xx in OpenAI's error shape; no 5xx, no
request left on a replica, nothing left admitted."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hexgen.dispatch import ReplicaState, make_policy
from hexgen.engine.messages import TokenEvent, TokenLogprobs
from hexgen.server.app import create_app
from hexgen.server.coordinator import Coordinator, ServeConfig
from hexgen.server.metrics import Metrics

# The same examples every run (derandomized, no example database left behind); HEXGEN_FUZZ_EXAMPLES=N draws N fresh
# random ones per test instead, for a longer search by hand.
EXAMPLES = os.environ.get("HEXGEN_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(EXAMPLES or 400), derandomize=EXAMPLES is None, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
MAX_CONTEXT = 64
MAX_OUTSTANDING = 8
ANSWER_TOKENS = 3  # the replicas answer every request with at most this many tokens


class AnsweringReplica:
    """Answers any request at once: min(max_new_tokens, ANSWER_TOKENS) tokens, with log-probabilities where asked."""

    def __init__(self, index: int, holds: int):
        self.index = index
        self.state = ReplicaState(outstanding=0, is_up=True, capacity_weight=1.0, max_context=holds)
        self.held: set[str] = set()

    async def submit(self, request):
        assert len(request.prompt_token_ids) + request.params.max_new_tokens <= self.state.max_context
        self.held.add(request.request_id)
        self.state.outstanding += 1
        queue: asyncio.Queue = asyncio.Queue()
        count = min(request.params.max_new_tokens, ANSWER_TOKENS)
        asked = request.params.logprobs
        for i in range(count):
            logprobs = None if asked is None else TokenLogprobs(-0.5, tuple((t, -1.0 - t) for t in range(asked)))
            prompt = None
            if i == 0 and request.params.prompt_logprobs is not None:
                prompt = tuple(TokenLogprobs(-2.0, ((1, -1.0),) * request.params.prompt_logprobs)
                               for _ in request.prompt_token_ids[1:])
            queue.put_nowait(TokenEvent(request.request_id, 100 + i, "length" if i == count - 1 else None, logprobs,
                                        prompt))
        return queue

    async def release(self, request_id, abort):
        self.held.discard(request_id)
        self.state.outstanding -= 1


@pytest.fixture(scope="module")
def served():
    from starlette.testclient import TestClient

    from hexgen.engine.checkpoint import resolve_model
    from hexgen.tokenizer import Tokenizer

    tokenizer = Tokenizer(resolve_model("smollm2-135m", progress=False).directory)
    replicas = [AnsweringReplica(0, MAX_CONTEXT), AnsweringReplica(1, MAX_CONTEXT // 2)]
    config = ServeConfig("tiny", max_context=MAX_CONTEXT, max_outstanding=MAX_OUTSTANDING, dtype="float32",
                         device="cpu", vocab_size=tokenizer.vocab_size)
    coordinator = Coordinator(config, tokenizer, replicas, make_policy("least-outstanding"), Metrics())
    with TestClient(create_app(coordinator), raise_server_exceptions=True) as client:
        yield client, coordinator, replicas


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
COMPLETION = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.7, "top_p": 0.9,
              "top_k": 5, "n": 2, "stream": True, "stop": ["\n"], "seed": 3, "logprobs": 2, "echo": False,
              "presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {"5": 1.0}, "ignore_eos": True,
              "stream_options": {"include_usage": True}, "user": "u"}
CHAT = {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_completion_tokens": 4, "temperature": 0.7, "n": 2, "stream": False, "logprobs": True, "top_logprobs": 2,
        "seed": 3, "stop": "\n", "logit_bias": {"7": -100}}
ENDPOINTS = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT}
DROP = object()  # a field left out
FIELD_VALUES = {  # values near each field's edges, valid and not
    "prompt": ["", "x", [], [[]], [1, 2], [[1], [2, 3]], [-1], [49152], [2**40], ["a", "b"], "é" * 50, "a\ud83d"],
    "max_tokens": [None, -1, 0, 1, 3, 60, 64, 10**9, 1.5, "4"],
    "n": [0, 1, 2, 8, 9, 16, 17],
    "logprobs": [None, 0, 5, 20, 21, True, -1],
    "stop": [None, "", [""], ["a", "b", "c", "d"], ["a"] * 16, ["a"] * 17, "x" * 500, [1], ["\ude00"]],
    "temperature": [0, 0.0, 1e-9, 2, 2.01, -0.0, 1e308],
    "top_p": [1e-9, 0.5, 1, 1.0000001, 0],
    "top_k": [0, 1, 49152, 10**12, -1],
    "seed": [None, 0, -1, 2**64, 2**100, -(2**100), 1.0],
    "stream": [True, False],
    "echo": [True, False],
    "presence_penalty": [-2, 2, 2.0001, 0],
    "logit_bias": [{}, {"0": -100}, {"49151": 100}, {"49152": 1}, {"x": 1}, {"1": 101}],
    "stream_options": [None, {}, {"include_usage": False}, {"include_usage": 1}, {"other": 1}],
    "top_logprobs": [None, 0, 20, 21],
    "messages": [[], [{"role": "user"}], [{"role": "assistant", "content": "a"}],
                 [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                 [{"role": "tool", "content": "x"}], [{"role": "user", "content": "x" * 400}],
                 [{"role": "user", "content": "\ud83d"}]],
}
ONE_FIELD_CASES = [  # (endpoint, body): each base with one field dropped or set to each of its edge values
    (path, {**{k: v for k, v in base.items() if k != name}, **({} if value is DROP else {name: value})})
    for path, base in ENDPOINTS.items()
    for name in base for value in [DROP, *FIELD_VALUES.get(name, [])]
]


@st.composite
def mutated(draw, base: dict) -> dict:
    """`base` with 0-3 of its fields replaced (most often by a value near the field's edges, else by any JSON
    value) or dropped,
    and sometimes a field added."""
    body = dict(base)
    for name in draw(st.lists(st.sampled_from(sorted(base)), max_size=3, unique=True)):
        edges = st.sampled_from(FIELD_VALUES[name]) if name in FIELD_VALUES else json_values
        value = draw(st.just(DROP) | edges | edges | edges | json_values)
        if value is DROP:
            del body[name]
        else:
            body[name] = value
    if draw(st.integers(0, 4)) == 0:
        body[draw(st.sampled_from(ADDED))] = draw(json_values)
    return body


ADDED = ["functions", "tools", "best_of", "suffix", "echo", "response_format", "max_completion_tokens", "min_p",
         "repetition_penalty", "top_logprobs", "prompt", "messages"]


def post(client, path: str, body: dict):
    """As Python's json writes it: NaN and Infinity as bare words, which some clients send and Python's parser takes."""
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def check(response, coordinator, replicas) -> None:
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert all("choices" in json.loads(e) or "usage" in json.loads(e) for e in events[:-1]), events
        else:
            assert response.json()["choices"]
    else:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"]
    assert coordinator.admitted == 0 and all(not r.held and r.state.outstanding == 0 for r in replicas)


def test_each_field_at_its_edges_gets_an_answer_or_a_4xx(served):
    client, coordinator, replicas = served
    statuses = []
    for path, body in ONE_FIELD_CASES:
        response = post(client, path, body)
        check(response, coordinator, replicas)
        statuses.append(response.status_code)
    assert statuses.count(200) > 40 and statuses.count(400) > 40  # both kinds of case are in the list


@FUZZ
@given(data=st.data(), path=st.sampled_from(sorted(ENDPOINTS)))
def test_random_bodies_get_an_answer_or_a_4xx(served, data, path):
    client, coordinator, replicas = served
    response = post(client, path, data.draw(mutated(ENDPOINTS[path]), label="body"))
    event(f"{path}: HTTP {response.status_code}")
    check(response, coordinator, replicas)


@FUZZ
@given(raw=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_bodies_that_are_not_requests_get_a_400(served, raw, path):
    client, coordinator, replicas = served
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    check(response, coordinator, replicas)


@pytest.mark.parametrize("depth", [10, 5000])
def test_deeply_nested_json_is_a_400(served, depth):
    client, coordinator, replicas = served
    response = client.post("/v1/completions", content=b"[" * depth + b"]" * depth,
                           headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    check(response, coordinator, replicas)
