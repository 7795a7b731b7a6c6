"""What OpenAI clients and vLLM-targeted tools send, against the real FastAPI app over in-process replicas (SmolLM2's
tokenizer and chat template): JSON nulls for defaults, vLLM's sampling extras at their neutral values, text that is
no Unicode, bodies that are not JSON, CORS; and the errors, in OpenAI's shape, naming the field the client sent."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient
from test_api_fuzz import AnsweringReplica

from hexgen.commands.serve import parse_origins
from hexgen.dispatch import make_policy
from hexgen.errors import UserError
from hexgen.server.app import create_app
from hexgen.server.coordinator import Coordinator, ServeConfig
from hexgen.server.metrics import Metrics
from hexgen.server.replica_client import Rejected

CONTEXT = 64
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer():
    from hexgen.engine.checkpoint import resolve_model
    from hexgen.tokenizer import Tokenizer

    return Tokenizer(resolve_model("smollm2-135m", progress=False).directory)


def make_coordinator(tokenizer) -> Coordinator:
    config = ServeConfig("tiny", CONTEXT, 8, "float32", "cpu", tokenizer.vocab_size)
    return Coordinator(config, tokenizer, [AnsweringReplica(0, CONTEXT)], make_policy("least-outstanding"), Metrics())


def make_client(tokenizer, **app_options) -> TestClient:
    return TestClient(create_app(make_coordinator(tokenizer), **app_options), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tokenizer):
    return make_client(tokenizer)


def post_raw(client: TestClient, path: str, raw: bytes, content_type: str | None = "application/json"):
    return client.post(path, content=raw, headers={"content-type": content_type} if content_type else {})


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def completion(client: TestClient, **fields):
    return client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, **fields})


def chat(client: TestClient, **fields):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 2, **fields})


# ---- text that is no Unicode; errors that are not the client's ----


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud83d", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "\\ude00b"], "max_tokens": 2}', "prompt.1"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "ok", "stop": "\\ud83d"}', "stop"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "ok", "stop": ["x", "\\ud83d"]}', "stop.1"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}',
     "messages.0.content"),
    ("/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages.0.content.0.text"),
])  # fmt: skip
def test_an_unpaired_surrogate_is_a_400_naming_the_field(client, path, raw, param):
    error = error_of(post_raw(client, path, raw))
    assert error["param"] == param and "unpaired surrogate" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_a_paired_surrogate_is_the_character(client):
    response = post_raw(client, "/v1/completions", b'{"model": "tiny", "prompt": "a\\ud83d\\ude00", "max_tokens": 2}')
    assert response.status_code == 200, response.text


class BrokenTokenizer:
    """SmolLM2's tokenizer, but encoding fails as a bug would."""

    def __init__(self, tokenizer):
        self.vocab_size = tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        raise RuntimeError("a bug")


def test_an_internal_error_is_a_json_500_not_plain_text(tokenizer):
    broken = make_client(BrokenTokenizer(tokenizer))
    error = error_of(completion(broken), 500)
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]


# ---- null is the default ----

NULLS = ["temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed", "user", "presence_penalty",
         "frequency_penalty", "logit_bias", "ignore_eos", "max_tokens"]


def test_null_means_the_default_for_every_optional_field(client):
    """AnsweringReplica answers token ids 100, 101, 102 ("t", "u", "v" in SmolLM2's vocabulary), at most max_tokens:
    the defaults (16 for completions, the rest of the context for chat) leave all three."""
    nulls = dict.fromkeys(NULLS)
    answer = completion(client, **nulls, echo=None, logprobs=None, best_of=None, suffix=None)
    assert answer.status_code == 200, answer.text
    choices = answer.json()["choices"]  # one choice (n 1), whole (not streamed), no echo, no log-probabilities
    assert [(c["index"], c["text"], c["logprobs"]) for c in choices] == [(0, "tuv", None)]
    messages = [{"role": "user", "content": "hi", "name": None}]
    answer = chat(client, **nulls, messages=messages, max_completion_tokens=None, logprobs=None, top_logprobs=None)
    assert answer.status_code == 200, answer.text
    choices = answer.json()["choices"]
    assert [(c["message"]["content"], c["logprobs"]) for c in choices] == [("tuv", None)]


def test_null_include_usage_is_false(client):
    answer = completion(client, stream=True, stream_options={"include_usage": None})
    events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
    assert events and all(e["choices"] for e in events)  # no usage chunk, whose choices are empty


def test_null_for_a_required_field_is_still_a_400(client):
    assert error_of(completion(client, prompt=None))["param"] == "prompt"
    assert error_of(chat(client, messages=None))["param"] == "messages"
    assert error_of(completion(client, tools=None))["param"] == "tools"  # unknown fields stay unknown


# ---- vLLM's extras ----


def test_vllm_bench_serve_completion_payload(client):
    payload = {"model": "tiny", "prompt": "hi", "repetition_penalty": 1.0, "max_tokens": 2, "logprobs": None,
               "stream": True, "stream_options": {"include_usage": True}}  # vllm/benchmarks/lib/endpoint_request_func
    answer = client.post("/v1/completions", json=payload)
    assert answer.status_code == 200, answer.text
    events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["text"] for e in events for c in e["choices"]) == "tu"
    assert events[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}  # "hi": 1 token


NEUTRAL = [("repetition_penalty", 1.0), ("repetition_penalty", 1), ("min_tokens", 0), ("min_p", 0),
           ("best_of", 1), ("skip_special_tokens", True), ("spaces_between_special_tokens", True),
           ("include_stop_str_in_output", False)]


@pytest.mark.parametrize("field, value", NEUTRAL + [(field, None) for field, _ in NEUTRAL])
def test_vllm_extras_at_their_neutral_values_are_taken(client, field, value):
    assert completion(client, **{field: value}).status_code == 200
    if field != "best_of":  # a /v1/completions field only, in OpenAI's API and vLLM's
        assert chat(client, **{field: value}).status_code == 200


@pytest.mark.parametrize("field, value, instead", [
    ("repetition_penalty", 1.1, "presence_penalty and frequency_penalty"),
    ("repetition_penalty", 0.9, "presence_penalty and frequency_penalty"),
    ("min_tokens", 1, "ignore_eos"),
    ("min_p", 0.05, "top_p and top_k"),
    ("best_of", 2, "n (choices)"),
    ("skip_special_tokens", False, "special tokens out"),
    ("spaces_between_special_tokens", False, "special tokens out"),
    ("include_stop_str_in_output", True, "before the stop string"),
])  # fmt: skip
def test_vllm_extras_that_would_change_the_answer_are_a_400_naming_them(client, field, value, instead):
    error = error_of(completion(client, **{field: value}))
    assert error["param"] == field and field in error["message"] and instead in error["message"]


def test_other_unknown_fields_are_still_a_400(client):
    assert error_of(completion(client, use_beam_search=False))["message"] == "unsupported field 'use_beam_search'"


# ---- stop, top_p ----


def test_sixteen_stop_strings_are_taken_and_seventeen_are_a_400(client):
    assert completion(client, stop=[f"s{i}" for i in range(16)]).status_code == 200
    error = error_of(completion(client, stop=[f"s{i}" for i in range(17)]))
    assert error["param"] == "stop" and "at most 16" in error["message"]


def test_top_p_zero_is_taken(client):
    assert completion(client, top_p=0, temperature=1, seed=3).status_code == 200
    assert error_of(completion(client, top_p=-0.01))["param"] == "top_p"


# ---- JSON types as OpenAI takes them ----

WRONG_TYPES = [  # a string or a boolean where a number is due, a number or a string where a boolean is
    ("max_tokens", "4"), ("max_tokens", True), ("n", "2"), ("n", False), ("top_k", "5"), ("seed", "1"),
    ("temperature", "0.5"), ("temperature", True), ("top_p", "1"), ("presence_penalty", "0"),
    ("frequency_penalty", False), ("logprobs", True), ("logprobs", "2"), ("stream", "true"), ("stream", 1),
    ("echo", "yes"), ("echo", 1), ("ignore_eos", "false"), ("logit_bias", {"5": "1"}), ("logit_bias", {"5": True}),
    ("repetition_penalty", "1.0"), ("skip_special_tokens", 1), ("best_of", "1"), ("prompt", [True, 2]),
    ("prompt", [["1"]]),
]


@pytest.mark.parametrize("field, value", WRONG_TYPES)
def test_a_value_of_the_wrong_json_type_is_a_400_naming_the_field(client, field, value):
    """pydantic's lax mode would read "4" or true as 4 or 1 (and a prompt [true, 2] as token ids 1, 2); OpenAI's
    API refuses them."""
    error = error_of(completion(client, **{field: value}))
    assert error["param"].split(".")[0] == field and error["type"] == "invalid_request_error", error


@pytest.mark.parametrize("fields", [{"logprobs": 1, "top_logprobs": 2}, {"logprobs": "true"},
                                    {"max_completion_tokens": "2"}, {"stream": True, "stream_options":
                                                                     {"include_usage": "yes"}}])
def test_a_chat_value_of_the_wrong_json_type_is_a_400(client, fields):
    error = error_of(chat(client, **fields))
    assert error["param"].split(".")[0] in fields, error


def test_whole_numbers_written_as_floats_are_still_taken(client):
    answer = completion(client, max_tokens=2.0, n=2.0, seed=3.0, top_k=5.0, logprobs=1.0, temperature=1)
    assert answer.status_code == 200, answer.text
    assert [c["text"] for c in answer.json()["choices"]] == ["tu", "tu"]
    assert completion(client, prompt=[1.0, 2.0]).status_code == 200
    assert error_of(completion(client, max_tokens=2.5))["param"] == "max_tokens"


@pytest.mark.parametrize("key", ["\u00b2", "\u0661", "\uff11", "+1", "1_0", "0x1"])
def test_logit_bias_keys_are_ascii_digits(client, key):
    """str.isdigit() takes superscripts (which int() refuses: this was a 500) and other scripts' digits."""
    raw = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "logit_bias": {"' + key.encode() + b'": 1}}'
    error = error_of(post_raw(client, "/v1/completions", raw))
    assert error["param"] == "logit_bias" and "token ids" in error["message"]


# ---- what errors name ----


def test_wrong_typed_content_names_the_field_without_pydantics_type_names(client):
    error = error_of(chat(client, messages=[{"role": "user", "content": 5}]))
    assert error["param"] == "messages.0.content"
    assert error["message"] == "messages.0.content: Input should be a valid string"
    error = error_of(chat(client, messages=[{"role": "user", "content": [{"type": "text", "txt": "x"}]}]))
    assert error["message"] == "messages.0.content.0.text: Field required"  # the list's branch got furthest
    assert error_of(completion(client, stop=5))["message"] == "stop: Input should be a valid string"


@pytest.mark.parametrize("sent", ["max_tokens", "max_completion_tokens"])
def test_a_token_limit_error_names_the_field_sent(client, sent):
    body = {"model": "tiny", "messages": USER, sent: 0}
    error = error_of(client.post("/v1/chat/completions", json=body))
    assert error["param"] == sent and error["message"] == f"{sent} must be >= 1, got 0"
    body[sent] = CONTEXT
    assert error_of(client.post("/v1/chat/completions", json=body))["param"] == sent


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", None, "text/plain"])
def test_a_body_not_sent_as_json_says_which_header_to_send(client, content_type):
    raw = json.dumps({"model": "tiny", "prompt": "hi"}).encode()  # curl -d: form-encoded
    error = error_of(post_raw(client, "/v1/completions", raw, content_type))
    assert "'Content-Type: application/json'" in error["message"]
    assert f"is {content_type or 'missing'}" in error["message"]
    error = error_of(post_raw(client, "/v1/completions", b"[1]"))  # JSON, just not an object: no word of headers
    assert "Content-Type" not in error["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("raw, says", [
    (b"", "the request body is empty; send a JSON object"),
    (b"[1]", "the request body must be a JSON object, got an array"),
    (b"null", "the request body must be a JSON object, got null"),
    (b'"hi"', "the request body must be a JSON object, got a string"),
    (b"5", "the request body must be a JSON object, got a number"),
])  # fmt: skip
def test_a_body_that_is_no_object_says_so(client, path, raw, says):
    """Rather than pydantic's "Field required" (an empty body) or "Input should be a valid dictionary or object to
    extract fields from"."""
    error = error_of(post_raw(client, path, raw))
    assert error["message"].startswith(says) and error["param"] is None, error


@pytest.mark.parametrize("stream", [False, None])
def test_stream_options_need_stream_true(client, stream):
    fields = {"stream_options": {"include_usage": True}} if stream is None else {
        "stream": stream, "stream_options": {"include_usage": True}}
    error = error_of(completion(client, **fields))
    assert error["param"] == "stream_options" and "stream: true" in error["message"]
    assert error_of(chat(client, **fields))["param"] == "stream_options"


# ---- metrics ----


def served_usage(coordinator, stream: bool, **fields) -> dict:
    """A completion through a fresh app on `coordinator`, whole or streamed (with its usage chunk): its usage."""
    if stream:
        fields["stream_options"] = {"include_usage": True}
    answer = completion(TestClient(create_app(coordinator)), stream=stream, **fields)
    assert answer.status_code == 200, answer.text
    events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
    return events[-1]["usage"] if stream else answer.json()["usage"]


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_tokens_are_counted_once_a_prompt_as_usage_counts_them(tokenizer, stream):
    """n choices share their prompt: hexgen_prompt_tokens_total counted it n times where usage counts it once."""
    coordinator = make_coordinator(tokenizer)
    usage = served_usage(coordinator, stream, prompt=["Once upon a time", "hi"], n=3)
    assert usage["prompt_tokens"] == 5  # "Once upon a time": 4 tokens, "hi": 1
    assert coordinator.metrics.registry.get_sample_value("hexgen_prompt_tokens_total") == 5


def test_requests_refused_for_load_or_shutdown_are_counted(tokenizer):
    """A 429 (the server full) or 503 (shutting down) is a request the server turned away: counted as "rejected",
    where it was counted nowhere."""
    coordinator = make_coordinator(tokenizer)
    client = TestClient(create_app(coordinator))
    coordinator.admitted = coordinator.config.max_outstanding  # as if that many were on their way to replicas
    assert error_of(completion(client), 429)["type"] == "rate_limit_exceeded"
    coordinator.admitted = 0
    coordinator.stop_admitting()
    assert error_of(chat(client), 503)["type"] == "server_error"
    for endpoint in ("completions", "chat"):
        labels = {"endpoint": endpoint, "status": "rejected"}
        assert coordinator.metrics.registry.get_sample_value("hexgen_requests_total", labels) == 1


def test_requests_refused_as_not_valid_are_counted(tokenizer):
    """A 4xx for a bad field, a prompt past the context or an unknown model was counted nowhere: now "invalid",
    under the endpoint it came to; a request that was served still counts as "ok"."""
    coordinator = make_coordinator(tokenizer)
    client = TestClient(create_app(coordinator))
    error_of(completion(client, temperature="hot"))  # refused by pydantic
    error_of(completion(client, prompt="hi " * CONTEXT))  # past the context
    error_of(completion(client, model="other"), 404)
    error_of(post_raw(client, "/v1/completions", b"not json"))
    error_of(chat(client, max_tokens=CONTEXT))  # past the context
    error_of(chat(client, model="other"), 404)
    assert completion(client).status_code == 200
    count = coordinator.metrics.registry.get_sample_value
    assert count("hexgen_requests_total", {"endpoint": "completions", "status": "invalid"}) == 4
    assert count("hexgen_requests_total", {"endpoint": "chat", "status": "invalid"}) == 2
    assert count("hexgen_requests_total", {"endpoint": "completions", "status": "ok"}) == 1


class RefusingReplica(AnsweringReplica):
    """A replica whose engine refuses every request it is sent (as one does a request its pool can never hold)."""

    async def submit(self, request):
        queue = await super().submit(request)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(Rejected("this replica refuses it"))
        return queue


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_fails_on_its_replica_is_counted_as_an_error(tokenizer, stream):
    """Refused on its replica after admission: a 400 with the replica's reason, counted once as "error", streamed
    (before its first token) or whole."""
    config = ServeConfig("tiny", CONTEXT, 8, "float32", "cpu", tokenizer.vocab_size)
    coordinator = Coordinator(config, tokenizer, [RefusingReplica(0, CONTEXT)], make_policy("least-outstanding"),
                              Metrics())
    client = TestClient(create_app(coordinator))
    assert error_of(completion(client, stream=stream))["message"] == "this replica refuses it"
    count = coordinator.metrics.registry.get_sample_value
    assert count("hexgen_requests_total", {"endpoint": "completions", "status": "error"}) == 1
    assert count("hexgen_requests_total", {"endpoint": "completions", "status": "ok"}) is None


@pytest.mark.parametrize("stream", [False, True])
def test_a_scoring_request_counts_no_generated_token_as_its_usage_says(tokenizer, stream):
    """echo with max_tokens 0 draws one token to score the prompt and answers none: hexgen_generation_tokens_total
    counted that token where usage reports 0 completion tokens."""
    coordinator = make_coordinator(tokenizer)
    usage = served_usage(coordinator, stream, prompt=["Once upon a time", "hi"], echo=True, max_tokens=0, logprobs=1)
    assert usage["completion_tokens"] == 0
    assert coordinator.metrics.registry.get_sample_value("hexgen_generation_tokens_total") == 0
    assert completion(TestClient(create_app(coordinator))).status_code == 200  # max_tokens 2: both counted
    assert coordinator.metrics.registry.get_sample_value("hexgen_generation_tokens_total") == 2


# ---- routes ----


@pytest.mark.parametrize("path", ["/v1/completions/", "/v1/chat/completions/", "/v1/nothing"])
def test_a_path_with_a_trailing_slash_is_a_404_not_a_redirect(client, path):
    """FastAPI answered `POST /v1/completions/` with a 307 and an empty body, which clients do not follow for a
    POST: now the OpenAI-style 404 that any unknown path gets."""
    answer = client.post(path, json={"model": "tiny", "prompt": "hi", "messages": USER}, follow_redirects=False)
    assert error_of(answer, 404)["type"] == "invalid_request_error"
    assert error_of(client.get("/health/", follow_redirects=False), 404)


def test_health_answers_head_as_load_balancers_probe(client):
    answer = client.head("/health")
    assert answer.status_code == 200 and answer.content == b""
    assert client.get("/health").json() == {"status": "ok", "replicas_up": 1}


# ---- CORS ----

PREFLIGHT = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.mark.parametrize("origins, allowed", [(("http://localhost:3000",), "http://localhost:3000"), (("*",), "*")])
def test_allowed_origins_answer_a_preflight_and_requests(tokenizer, origins, allowed):
    with make_client(tokenizer, api_key="k", allowed_origins=origins) as browser:
        preflight = browser.options("/v1/chat/completions", headers=PREFLIGHT)  # a preflight carries no API key
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == allowed
        assert "POST" in preflight.headers["access-control-allow-methods"]
        answer = browser.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 2},
                              headers={"Origin": "http://localhost:3000", "Authorization": "Bearer k"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == allowed


def test_no_cors_headers_by_default(client):
    preflight = client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    answer = chat(client)
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_allowed_origins_flag():
    assert parse_origins(None) == ()
    assert parse_origins("*") == ("*",)
    assert parse_origins("http://localhost:3000, https://chat.example.com") == (
        "http://localhost:3000", "https://chat.example.com")
    for bad in ("", "http://a,,http://b", "http://a,", "localhost:3000", "http://a/", "ftp://a"):
        with pytest.raises(UserError, match="--allowed-origins"):
            parse_origins(bad)
