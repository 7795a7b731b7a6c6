"""`hexgen serve` end to end on a tiny model: a plan of a two-stage replica with unequal TP degrees and layers
(TP 2 x 1 layer -> TP 1 x 3 layers) and a one-rank replica. Greedy answers are compared with the engine's
one-process output; errors with OpenAI's shapes; metrics with counts computed from the answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import EOS_AT, EOS_PROMPT, Server, metric_value, serving, sse_events, write_plan

API_KEY = "test-key"
MAX_CONTEXT = 2048
MAX_QUEUE = 4
PROMPTS = ["Once upon a time", "The weather today is", "def fibonacci(n):", "Paris is the capital of"]


@pytest.fixture(scope="module")
def server(chat_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-api")
    plan = write_plan(tmp / "plan.json", chat_model_dir, [[([0, 1], (0, 1)), ([2], (1, 4))], [([3], (0, 4))]])
    srv = Server(
        chat_model_dir,
        tmp / "serve.log",
        "--plan", str(plan), "--max-context", str(MAX_CONTEXT), "--max-queue", str(MAX_QUEUE), "--max-batch", "8",
        api_key=API_KEY,
    )  # fmt: skip
    with serving(srv):
        yield srv


@pytest.fixture
def idle(server) -> Server:
    server.wait_idle()
    return server


def model_name(server: Server) -> str:
    return server.status()["model"]


def complete(server: Server, prompt, max_tokens: int, **extra) -> dict:
    body = {"model": model_name(server), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = server.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


# ---- start-up, plan, status ----


def test_status_shows_the_plan_and_every_replica_up(idle):
    status = idle.status()
    assert (status["dtype"], status["device"]) == ("float32", "cpu")  # as the server was started
    assert status["dispatch"] == "LeastOutstanding"  # the default --dispatch of a plan without predictions
    layouts = [[(s["tp"], tuple(s["layers"])) for s in r["stages"]] for r in status["replicas"]]
    assert layouts == [[(2, (0, 1)), (1, (1, 4))], [(1, (0, 4))]]
    assert [r["ranks"] for r in status["replicas"]] == [3, 1]
    assert len(idle.ranks_seen) == 4  # one process per rank
    assert [r["status"] for r in status["replicas"]] == ["up", "up"]


def test_a_plan_without_predictions_gets_replica_speeds_measured_at_start_up(idle):
    # the plan file carries no predictions: each replica decoded a probe alone, its weight is tokens/s, and a lone
    # request goes to the fastest idle replica
    line = next(x for x in idle.log().splitlines() if "replica speeds measured" in x)
    status = idle.status()
    weights = [r["capacity_weight"] for r in status["replicas"]]
    assert all(w > 1.0 for w in weights), weights  # a tiny model decodes far more than 1 token/s
    assert line.endswith(f"replica 0: {weights[0]:.1f}, replica 1: {weights[1]:.1f}")
    fastest = max(range(2), key=weights.__getitem__)
    body = {"model": model_name(idle), "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    busy = []
    with httpx.stream("POST", idle.url + "/v1/completions", json=body, headers=idle.headers, timeout=60) as response:
        for line in response.iter_lines():  # while it streams, the request is outstanding on its replica
            outstanding = [r["outstanding_requests"] for r in idle.status()["replicas"]]
            if line.startswith("data: ") and any(outstanding):
                busy = [i for i, n in enumerate(outstanding) if n]
                break
    assert busy == [fastest], (weights, busy)


def test_server_process_imports_no_torch(idle):
    maps = Path(f"/proc/{idle.proc.pid}/maps").read_text()
    assert "libtorch" not in maps
    ranks = [Path(f"/proc/{pid}/maps").read_text() for pid in idle.ranks_seen]
    assert all("libtorch" in m for m in ranks)  # the check would see torch where it is



def test_status_and_metrics_count_the_engine_steps_of_each_request(idle):
    """A request of P prompt tokens and n output tokens (alone, shorter than a KV block: no prefix-cache hit) takes
    n steps: one computes its P prompt tokens and samples the first token, then n - 1 steps compute one token each
    and sample the next."""
    def totals():
        replicas = idle.status()["replicas"]
        return [r["engine"] for r in replicas]

    before = totals()
    started = time.monotonic()
    answers = [complete(idle, p, n, ignore_eos=True) for p, n in zip(PROMPTS[:3], (3, 5, 1), strict=True)]
    elapsed_s = time.monotonic() - started

    def delta_of(after) -> dict[str, float]:
        return {key: sum(a[key] - b[key] for a, b in zip(after, before, strict=True))
                for key in ("steps", "step_tokens", "sampled_tokens", "busy_s")}

    deadline = time.monotonic() + 5  # the totals arrive with the replicas' heartbeats, just after the answers
    while delta_of(after := totals())["sampled_tokens"] < 9 and time.monotonic() < deadline:
        time.sleep(0.05)
    delta = delta_of(after)
    prompts = [a["usage"]["prompt_tokens"] for a in answers]
    assert all(p + n < 16 for p, n in zip(prompts, (3, 5, 1), strict=True))  # the premise: no full KV block
    assert delta["steps"] == 3 + 5 + 1
    assert delta["sampled_tokens"] == 3 + 5 + 1
    assert delta["step_tokens"] == sum(prompts) + (3 - 1) + (5 - 1) + (1 - 1)
    assert 0 < delta["busy_s"] < elapsed_s
    for replica in after:
        assert replica["mean_step_ms"] == pytest.approx(1000 * replica["busy_s"] / replica["steps"], abs=1e-3)
        assert replica["mean_tokens_per_step"] == pytest.approx(replica["step_tokens"] / replica["steps"], abs=1e-3)
    text = idle.get("/metrics").text
    for index, replica in enumerate(after):
        label = f'replica="{index}"'
        assert metric_value(text, "hexgen_replica_engine_steps", label) == replica["steps"]
        assert metric_value(text, "hexgen_replica_engine_step_tokens", label) == replica["step_tokens"]
        assert metric_value(text, "hexgen_replica_engine_sampled_tokens", label) == replica["sampled_tokens"]
        assert metric_value(text, "hexgen_replica_engine_busy_seconds", label) == pytest.approx(replica["busy_s"])

# ---- API key ----


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/v1/models"), ("GET", "/v1/models/any"), ("GET", "/metrics"), ("GET", "/status"),
     ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")],
)  # fmt: skip
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY + "x"}])
def test_api_key_is_required_on_every_endpoint_but_health(idle, method, path, headers):
    response = httpx.request(method, idle.url + path, headers=headers, json={}, timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(idle.url + "/health", timeout=10).json() == {"status": "ok", "replicas_up": 2}


def test_models_lists_the_served_model(idle):
    data = idle.get("/v1/models").json()
    assert [m["id"] for m in data["data"]] == [model_name(idle)]
    assert data["data"][0]["max_model_len"] == MAX_CONTEXT
    assert idle.get(f"/v1/models/{model_name(idle)}").json() == data["data"][0]
    client = openai.OpenAI(base_url=idle.url + "/v1", api_key=API_KEY, max_retries=0)
    assert client.models.retrieve(model_name(idle)).id == model_name(idle)
    for other in ("other", "org/other"):
        response = idle.get(f"/v1/models/{other}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_a_body_past_the_limit_is_refused_unread_or_when_it_passes_it(idle):
    """The body limit (here its floor, 1 MiB: 4 requests x 2,048 tokens x 64 bytes is less): a 413 in OpenAI's
    shape whether the body says its length or comes in chunks; a body under it is read."""
    limit = 1 << 20
    body = json.dumps({"model": model_name(idle), "prompt": "hi " * (limit // 3), "max_tokens": 1}).encode()
    headers = {**idle.headers, "content-type": "application/json"}
    said = httpx.post(idle.url + "/v1/completions", content=body, headers=headers, timeout=60)
    pieces = iter([body[i:i + 65536] for i in range(0, len(body), 65536)])  # no Content-Length: sent in chunks
    chunked = httpx.post(idle.url + "/v1/completions", content=pieces, headers=headers, timeout=60)
    for response in (said, chunked):
        assert response.status_code == 413, response.text
        assert "takes at most 1,048,576 bytes" in response.json()["error"]["message"]
    assert f"is {len(body):,} bytes" in said.json()["error"]["message"]
    under = idle.post("/v1/completions", {"model": model_name(idle), "prompt": "hi " * 300_000, "max_tokens": 1})
    assert under.status_code == 400 and under.json()["error"]["code"] == "context_length_exceeded"


# ---- completions against the engine's one-process output ----


def test_completion_matches_engine_reference(idle, reference):
    for prompt in PROMPTS[:2]:
        ref = reference.text(prompt, 12)
        body = complete(idle, prompt, 12)
        choice = body["choices"][0]
        assert choice["text"] == ref.text
        assert choice["finish_reason"] == ref.finish_reason == "length"
        prompt_tokens = len(reference.tokenizer.encode(prompt))
        assert body["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 12,
            "total_tokens": prompt_tokens + 12,
        }
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")


def test_token_id_prompt_and_served_name(idle, reference):
    ids = reference.tokenizer.encode(PROMPTS[2])
    assert complete(idle, ids, 6)["choices"][0]["text"] == reference.complete(ids, 6).text


def test_eos_gives_finish_reason_stop(idle, reference):
    ref = reference.text(EOS_PROMPT, 20)
    assert (ref.finish_reason, len(ref.token_ids)) == ("stop", EOS_AT)  # transformers put EOS there
    body = complete(idle, EOS_PROMPT, 20)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == EOS_AT
    assert body["choices"][0]["text"] == ref.text
    ignored = complete(idle, EOS_PROMPT, 8, ignore_eos=True)
    assert ignored["choices"][0]["finish_reason"] == "length" and ignored["usage"]["completion_tokens"] == 8


def test_stop_string_gives_finish_reason_stop(idle, reference):
    full = reference.text(PROMPTS[0], 16).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    ref = reference.text(PROMPTS[0], 16, stop=(stop,))
    assert ref.finish_reason == "stop" and ref.text == full[: full.index(stop)]
    choice = complete(idle, PROMPTS[0], 16, stop=[stop])["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (ref.text, "stop")


def test_streamed_completion_equals_the_full_answer(idle, reference):
    ref = reference.text(PROMPTS[1], 10)
    body = {"model": model_name(idle), "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", idle.url + "/v1/completions", json=body, headers=idle.headers, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10


def test_chat_completion_uses_the_chat_template(idle, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    ids = reference.tokenizer.apply_chat_template(messages)
    ref = reference.complete(ids, 8)
    body = {"model": model_name(idle), "messages": messages, "max_completion_tokens": 8, "temperature": 0}
    response = idle.post("/v1/chat/completions", body).json()
    assert response["object"] == "chat.completion" and response["id"].startswith("chatcmpl-")
    message = response["choices"][0]["message"]
    assert message == {"role": "assistant", "content": ref.text}
    assert response["usage"]["prompt_tokens"] == len(ids)
    with httpx.stream("POST", idle.url + "/v1/chat/completions", json={**body, "stream": True}, headers=idle.headers,
                      timeout=60) as stream:  # fmt: skip
        events = sse_events(stream)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == ref.text


# ---- several choices (n) ----


def test_n_choices_are_the_seeded_single_requests(idle):
    """Choice i of a seeded request with n choices is the request with seed + i alone; usage counts them all."""
    base = {"model": model_name(idle), "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0.9, "ignore_eos": True}
    many = idle.post("/v1/completions", {**base, "n": 3, "seed": 11}).json()
    singles = [idle.post("/v1/completions", {**base, "seed": 11 + i}).json() for i in range(3)]
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert [c["text"] for c in many["choices"]] == [s["choices"][0]["text"] for s in singles]
    assert len({c["text"] for c in many["choices"]}) > 1  # the seeds differ, so do the draws
    assert many["usage"]["completion_tokens"] == 3 * 8 and many["usage"]["prompt_tokens"] == singles[0]["usage"][
        "prompt_tokens"]


def test_seeds_count_by_their_low_64_bits(idle):
    """Any integer seed is accepted: one past 64 bits draws as its low 64 bits, a negative one as its two's
    complement; n choices of the largest seed wrap around to 0 (the channel carries at most 64-bit integers)."""
    base = {"model": model_name(idle), "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0.9, "ignore_eos": True}

    def text(seed: int, n: int = 1) -> list[str]:
        response = idle.post("/v1/completions", {**base, "seed": seed, "n": n})
        assert response.status_code == 200, response.text
        return [c["text"] for c in response.json()["choices"]]

    assert text(5 + 2**70) == text(5) and text(-1) == text(2**64 - 1)
    assert text(2**64 - 1, n=2) == [*text(2**64 - 1), *text(0)]
    assert text(5) != text(6)  # the seeds above are told apart
    assert idle.status()["replicas"][0]["outstanding_requests"] == 0


def test_n_streamed_chat_choices_equal_the_whole_answer(idle, reference):
    body = {"model": model_name(idle), "messages": [{"role": "user", "content": "Count."}], "max_tokens": 6,
            "temperature": 0.8, "seed": 3, "n": 2}  # fmt: skip
    whole = idle.post("/v1/chat/completions", body).json()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}  # options only with stream: true
    with httpx.stream("POST", idle.url + "/v1/chat/completions", json=streamed, headers=idle.headers,
                      timeout=60) as stream:  # fmt: skip
        events = sse_events(stream)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    texts, roles, finishes = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        roles[choice["index"]].append(choice["delta"].get("role"))
        finishes[choice["index"]].append(choice["finish_reason"])
    assert [texts[i] for i in (0, 1)] == [c["message"]["content"] for c in whole["choices"]]
    for i in (0, 1):  # each choice's first chunk names the role, its last the finish reason
        assert roles[i][0] == "assistant" and set(roles[i][1:]) <= {None}
        assert finishes[i][-1] == whole["choices"][i]["finish_reason"] and set(finishes[i][:-1]) <= {None}
    assert usage["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


def test_n_greedy_choices_are_the_greedy_answer(idle, reference):
    ref = reference.text(PROMPTS[0], 6)
    answer = complete(idle, PROMPTS[0], 6, n=2)
    assert [c["text"] for c in answer["choices"]] == [ref.text, ref.text]


def test_top_p_zero_is_the_greedy_answer_even_when_sampling_with_a_seed(idle, reference):
    ref = reference.text(PROMPTS[1], 8)
    answer = complete(idle, PROMPTS[1], 8, temperature=1.0, top_p=0, seed=11, n=2)
    assert [c["text"] for c in answer["choices"]] == [ref.text, ref.text]


def test_n_beyond_the_servers_limit_is_a_400_naming_it(idle):
    response = idle.post("/v1/completions", {"model": model_name(idle), "prompt": "x", "n": MAX_QUEUE + 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "n" and f"at most {MAX_QUEUE}" in error["message"]


# ---- log-probabilities, against HF transformers over the same tokens ----


@pytest.fixture(scope="module")
def hf_model(chat_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(chat_model_dir)).eval()


def hf_logprobs(model, prompt_ids: list[int], token_ids: list[int]):
    """[len(token_ids), V] log-softmax of HF's logits at each generated token's position (teacher-forced)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + token_ids])).logits[0, len(prompt_ids) - 1 : -1]
    return logits.float().log_softmax(dim=-1)


def test_completion_logprobs_match_transformers_whole_and_streamed(idle, reference, hf_model):
    tokenizer = reference.tokenizer
    prompt_ids = tokenizer.encode(PROMPTS[3])
    ref = reference.complete(prompt_ids, 8)
    expected = hf_logprobs(hf_model, prompt_ids, ref.token_ids)
    whole = complete(idle, PROMPTS[3], 8, logprobs=3)["choices"][0]
    assert whole["text"] == ref.text
    logprobs = whole["logprobs"]
    texts = [tokenizer.token_text(t) for t in ref.token_ids]
    assert logprobs["tokens"] == texts
    assert logprobs["text_offset"] == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    assert logprobs["token_logprobs"] == pytest.approx([expected[i, t].item() for i, t in enumerate(ref.token_ids)],
                                                       abs=1e-3)
    for step, top in enumerate(logprobs["top_logprobs"]):
        values, ids = expected[step].topk(3)  # greedy: the sampled token is the first of them
        want = {tokenizer.token_text(i): v for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
        assert top == pytest.approx(want, abs=1e-3)
    body = {"model": model_name(idle), "prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0, "logprobs": 3,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", idle.url + "/v1/completions", json=body, headers=idle.headers, timeout=60) as response:
        chunks = [e["choices"][0]["logprobs"] for e in sse_events(response)[:-1]]
    assert sum((c["tokens"] for c in chunks), []) == texts
    assert sum((c["text_offset"] for c in chunks), []) == logprobs["text_offset"]
    assert sum((c["token_logprobs"] for c in chunks), []) == pytest.approx(logprobs["token_logprobs"], abs=1e-3)


def test_echo_scores_the_prompt_as_transformers_does_whole_and_streamed(idle, reference, hf_model):
    """echo + logprobs (how evaluation harnesses score a text): the prompt's tokens first, the first without a
    score, each other one scored as HF's log-softmax over the prompt, then the completion's tokens."""
    tokenizer = reference.tokenizer
    prompt_ids = tokenizer.encode(PROMPTS[0])
    ref = reference.complete(prompt_ids, 2)
    expected = hf_logprobs(hf_model, prompt_ids[:1], prompt_ids[1:] + ref.token_ids)  # every position after the first
    body = complete(idle, PROMPTS[0], 2, logprobs=2, echo=True)
    choice = body["choices"][0]
    assert choice["text"] == PROMPTS[0] + ref.text and body["usage"]["completion_tokens"] == 2
    logprobs = choice["logprobs"]
    ids = prompt_ids + ref.token_ids
    texts = [tokenizer.token_text(t) for t in ids]
    assert logprobs["tokens"] == texts
    assert logprobs["text_offset"] == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx([expected[i, t].item() for i, t in enumerate(ids[1:])],
                                                           abs=1e-3)
    for step, top in enumerate(logprobs["top_logprobs"][1:]):
        values, top_ids = expected[step].topk(2)
        want = {tokenizer.token_text(i): v for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)}
        want.setdefault(texts[step + 1], expected[step, ids[step + 1]].item())  # the scored token, if not among them
        assert top == pytest.approx(want, abs=1e-3)
    stream_body = {"model": model_name(idle), "prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0, "logprobs": 2,
                   "echo": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", idle.url + "/v1/completions", json=stream_body, headers=idle.headers,
                      timeout=60) as response:  # fmt: skip
        chunks = [e["choices"][0] for e in sse_events(response)[:-1]]
    assert "".join(c["text"] for c in chunks) == choice["text"] and chunks[0]["text"].startswith(PROMPTS[0])
    assert sum((c["logprobs"]["tokens"] for c in chunks), []) == texts
    assert sum((c["logprobs"]["text_offset"] for c in chunks), []) == logprobs["text_offset"]
    plain = complete(idle, PROMPTS[0], 2, echo=True)["choices"][0]  # echo alone: the text, no scores
    assert plain["text"] == PROMPTS[0] + ref.text and plain["logprobs"] is None


def test_chat_logprobs_match_transformers_through_the_openai_client(idle, reference, hf_model):
    tokenizer = reference.tokenizer
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt_ids = tokenizer.apply_chat_template(messages)
    ref = reference.complete(prompt_ids, 6)
    expected = hf_logprobs(hf_model, prompt_ids, ref.token_ids)
    client = openai.OpenAI(base_url=idle.url + "/v1", api_key=API_KEY, max_retries=0)
    answer = client.chat.completions.create(model=model_name(idle), messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=2).choices[0]
    assert answer.message.content == ref.text
    content = answer.logprobs.content
    assert [c.token for c in content] == [tokenizer.token_text(t) for t in ref.token_ids]
    assert b"".join(bytes(c.bytes) for c in content) == ref.text.encode()  # pieces of characters included
    for step, (entry, token) in enumerate(zip(content, ref.token_ids, strict=True)):
        assert entry.logprob == pytest.approx(expected[step, token].item(), abs=1e-3)
        values, ids = expected[step].topk(2)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.token_text(i) for i in ids.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-3)
    plain = client.chat.completions.create(model=model_name(idle), messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_penalties_and_logit_bias_match_brute_force(idle, reference, hf_model):
    """Greedy decoding with OpenAI's adjustment applied by hand to HF's logits, one whole forward per token."""
    import torch

    tokenizer = reference.tokenizer
    prompt_ids = tokenizer.encode(PROMPTS[1])
    plain = reference.complete(prompt_ids, 12, ignore_eos=True).token_ids
    frequency, presence, bias = 1.2, 0.4, {plain[1]: -100.0, 17: 3.0}  # the plain answer's second token banned
    ids, out = list(prompt_ids), []
    for _ in range(12):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
        for token in set(out):
            logits[token] -= frequency * out.count(token) + presence
        for token, value in bias.items():
            logits[token] += value
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    answer = complete(idle, PROMPTS[1], 12, ignore_eos=True, frequency_penalty=frequency, presence_penalty=presence,
                      logit_bias={str(token): value for token, value in bias.items()})
    assert answer["choices"][0]["text"] == tokenizer.decode(out) != tokenizer.decode(plain)


def test_several_prompts_get_their_choices_prompt_after_prompt(idle, reference):
    tokenizer = reference.tokenizer
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    refs = [reference.complete(i, 5) for i in ids]
    body = complete(idle, PROMPTS[:2], 5, n=2)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [refs[0].text] * 2 + [refs[1].text] * 2
    assert body["usage"] == {"prompt_tokens": len(ids[0]) + len(ids[1]), "completion_tokens": 20,
                             "total_tokens": len(ids[0]) + len(ids[1]) + 20}
    stream_body = {"model": model_name(idle), "prompt": ids, "max_tokens": 5, "temperature": 0, "echo": True,
                   "stream": True}  # fmt: skip
    with httpx.stream("POST", idle.url + "/v1/completions", json=stream_body, headers=idle.headers,
                      timeout=60) as response:  # fmt: skip
        texts: dict[int, str] = {}
        for event in sse_events(response)[:-1]:
            (choice,) = event["choices"]
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {i: tokenizer.decode(ids[i]) + refs[i].text for i in (0, 1)}
    response = idle.post("/v1/completions", {"model": model_name(idle), "prompt": PROMPTS[:3], "n": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"  # 6 > MAX_QUEUE sequences


def test_scoring_a_text_as_an_evaluation_harness_does(idle, reference, hf_model):
    """One prompt as a list of token-id lists, one token, echo with logprobs 1: the log-likelihood of the text's
    last tokens given the first ones is the sum of their scores, and greedy where each scored token is the top one."""
    ids = reference.tokenizer.encode(PROMPTS[2] + " return x")
    context = 4
    body = idle.post("/v1/completions", {"model": model_name(idle), "prompt": [ids], "max_tokens": 1,
                                         "temperature": 0, "logprobs": 1, "echo": True}).json()  # fmt: skip
    logprobs = body["choices"][0]["logprobs"]
    scores = logprobs["token_logprobs"][context:-1]
    expected = hf_logprobs(hf_model, ids[:1], ids[1:])
    assert len(logprobs["token_logprobs"]) == len(ids) + 1
    assert sum(scores) == pytest.approx(sum(expected[i - 1, ids[i]].item() for i in range(context, len(ids))),
                                        abs=1e-3)
    greedy = [max(top, key=top.get) == token for token, top in zip(logprobs["tokens"][context:-1],
                                                                  logprobs["top_logprobs"][context:-1], strict=True)]
    assert greedy == [expected[i - 1].argmax().item() == ids[i] for i in range(context, len(ids))]
    # max_tokens 0 (OpenAI's legacy way to score a text): the same scores, no generated token, whole or streamed
    scored = {"model": model_name(idle), "prompt": [ids], "max_tokens": 0, "logprobs": 1, "echo": True}
    body = idle.post("/v1/completions", scored).json()
    choice = body["choices"][0]
    assert choice["text"] == reference.tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [expected[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-3)
    with httpx.stream("POST", idle.url + "/v1/completions", json={**scored, "stream": True}, headers=idle.headers,
                      timeout=60) as response:  # fmt: skip
        chunks = [e["choices"][0] for e in sse_events(response)[:-1]]
    assert "".join(c["text"] for c in chunks) == choice["text"] and chunks[-1]["finish_reason"] == "length"
    assert sum((c["logprobs"]["tokens"] for c in chunks), []) == choice["logprobs"]["tokens"]
    plain = idle.post("/v1/completions", {**scored, "echo": False})
    assert plain.status_code == 400 and "0 only with echo" in plain.json()["error"]["message"]


# ---- the official openai client ----


def test_openai_client_sync_async_and_streaming(idle, reference):
    name = model_name(idle)
    client = openai.OpenAI(base_url=idle.url + "/v1", api_key=API_KEY, max_retries=0)
    ref = reference.text(PROMPTS[3], 8)
    completion = client.completions.create(model=name, prompt=PROMPTS[3], max_tokens=8, temperature=0)
    assert completion.choices[0].text == ref.text and completion.usage.completion_tokens == 8
    stream = client.completions.create(model=name, prompt=PROMPTS[3], max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == ref.text
    assert [m.id for m in client.models.list()] == [name]
    messages = [{"role": "user", "content": "Hi!"}]
    chat_ref = reference.complete(reference.tokenizer.apply_chat_template(messages), 6)

    async def async_chat():
        aclient = openai.AsyncOpenAI(base_url=idle.url + "/v1", api_key=API_KEY, max_retries=0)
        full = await aclient.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
        parts = []
        async for chunk in await aclient.chat.completions.create(
            model=name, messages=messages, max_tokens=6, temperature=0, stream=True
        ):
            parts.append(chunk.choices[0].delta.content or "")
        await aclient.close()
        return full.choices[0].message.content, "".join(parts)

    assert asyncio.run(async_chat()) == (chat_ref.text, chat_ref.text)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=idle.url + "/v1", api_key="bad", max_retries=0).models.list()


# ---- continuous batching ----


async def _timed_stream(server: Server, prompt: str, max_tokens: int) -> tuple[str, list[float]]:
    body = {"model": model_name(server), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    text, times = [], []
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
                    times.append(time.monotonic())
    return "".join(text), times


def _peak_batches(server: Server, at_least: int, timeout_s: float = 5.0) -> list[int]:
    """Each replica's largest batch so far, from /status (refreshed by the drivers' once-a-second heartbeat)."""
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = httpx.get(server.url + "/status", headers=server.headers).json()["replicas"]
        peaks = [r["peak_running"] for r in replicas]
        if max(peaks) >= at_least or time.monotonic() > deadline:
            return peaks
        time.sleep(0.2)


def test_concurrent_requests_are_batched_and_greedy_output_is_unchanged(idle, reference):
    max_tokens = 48
    prompts = PROMPTS[:MAX_QUEUE]  # as many as the server admits at once, spread over 2 replicas

    async def run_all():
        return await asyncio.gather(*(_timed_stream(idle, p, max_tokens) for p in prompts))

    results = asyncio.run(run_all())
    for prompt, (text, _) in zip(prompts, results, strict=True):
        assert text == reference.text(prompt, max_tokens, ignore_eos=True).text  # alone == beside others
    # A replica that served one request at a time would never have run a step with 2 or more sequences.
    assert max(_peak_batches(idle, at_least=2)) >= 2


# ---- bad input: 4xx with an OpenAI error body; the replicas stay up ----


def _long_prompt() -> str:
    return "hello " * (MAX_CONTEXT + 10)


BAD_COMPLETIONS = [
    ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": _long_prompt()}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": MAX_CONTEXT}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": -0.1}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 17}, 400, "n"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"tok": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"49152": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "tools": []}, 400, "tools"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": [1, 10**9]}, 400, "prompt"),
    ({}, 400, "prompt"),
]


@pytest.mark.parametrize("body, status, param", BAD_COMPLETIONS)
def test_bad_completion_requests(idle, body, status, param):
    full = {"model": model_name(idle), **body}
    for stream in (False, True):
        response = idle.post("/v1/completions", {**full, "stream": stream})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param
        assert error["type"] == "invalid_request_error"


def test_bad_chat_requests_and_malformed_json(idle):
    name = model_name(idle)
    bad = [
        ({"model": name, "messages": []}, "messages"),
        ({"model": name, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": name, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
         "max_completion_tokens"),
        ({"model": name, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"model": name, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
         "top_logprobs"),
    ]
    for body, param in bad:
        response = idle.post("/v1/chat/completions", body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    for raw in (b"{not json", b"", b"[1, 2]"):
        response = httpx.post(idle.url + "/v1/completions", content=raw, timeout=10,
                              headers={**idle.headers, "content-type": "application/json"})  # fmt: skip
        assert response.status_code == 400, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(idle.url + "/v1/nothing", headers=idle.headers, timeout=10).json()["error"]["message"]
    assert [r["status"] for r in idle.status()["replicas"]] == ["up", "up"]


# ---- disconnects, 429 ----


@pytest.mark.parametrize("stream, n", [(True, 1), (False, 1), (True, 2), (False, 2)])
def test_client_disconnect_stops_generation(idle, stream, n):
    """Ask for MAX_CONTEXT - 64 tokens (~6 s on the one-rank replica here, ~20 s on the pipeline), leave once every
    sequence has run; the replicas' batches must be empty again soon (with n choices, every choice's sequence)."""
    cancelled = 'endpoint="completions",status="cancelled"'
    before = metric_value(idle.get("/metrics").text, "hexgen_requests_total", cancelled, default=0.0)
    body = {"model": model_name(idle), "prompt": PROMPTS[0], "max_tokens": MAX_CONTEXT - 64, "ignore_eos": True,
            "stream": stream, "n": n, "temperature": 0.5}  # fmt: skip
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", idle.port), timeout=30) as sock:
        sock.sendall(head.encode() + payload)
        # Two choices go to the two replicas, which may start them far apart on loaded cores: each replica's most
        # sequences seen running at once (the driver reports a change at once) must add up to n, not one instant's.
        deadline, peak = time.monotonic() + 20, [0, 0]
        while sum(peak) < n:
            assert time.monotonic() < deadline, "the request never ran"
            peak = [max(p, r["running"]) for p, r in zip(peak, idle.status()["replicas"], strict=True)]
            time.sleep(0.05)
        if stream:
            assert b"data: " in sock.recv(65536) or b"data: " in sock.recv(65536)
    left = time.monotonic()  # the connection is gone mid-generation
    idle.wait_idle(timeout_s=5)  # finishing would take longer; the sequences were aborted
    assert time.monotonic() - left < 5
    assert metric_value(idle.get("/metrics").text, "hexgen_requests_total", cancelled) == before + 1


def test_full_queue_answers_429_with_retry_after(idle):
    # Each held stream decodes ~2,000 tokens (several seconds here); on a machine loaded enough that one of them ends
    # before the fifth request is answered, the attempt is repeated (the fifth is then rightly admitted).
    body = {"model": model_name(idle), "prompt": PROMPTS[1], "max_tokens": MAX_CONTEXT - 64, "ignore_eos": True,
            "stream": True}

    def outstanding() -> int:
        return sum(r["outstanding_requests"] for r in idle.status()["replicas"])

    for _attempt in range(3):
        idle.wait_idle(timeout_s=10)  # the last attempt's streams, closed, have left their places
        with contextlib.ExitStack() as held:
            for _ in range(MAX_QUEUE):  # the response starts with the first token: each holds a place from then on
                client = held.enter_context(httpx.Client(timeout=60, headers=idle.headers))
                response = held.enter_context(client.stream("POST", idle.url + "/v1/completions", json=body))
                assert response.status_code == 200
            if outstanding() != MAX_QUEUE:
                continue  # a held stream has already ended
            response = idle.post("/v1/completions", {**body, "stream": False, "max_tokens": 2})
            if response.status_code != 429 and outstanding() < MAX_QUEUE:
                continue  # one ended in between: the fifth was admitted into its place
            assert response.status_code == 429
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "rate_limit_exceeded"
            break
    else:
        raise AssertionError("a held stream ended before the fifth request in every attempt")
    idle.wait_idle(timeout_s=10)
    assert complete(idle, PROMPTS[1], 2)["usage"]["completion_tokens"] == 2  # room again


def test_a_burst_gets_no_more_places_than_the_limit(idle):
    """Requests arriving together are admitted up to the limit of requests in flight, the rest answered 429: none
    slips in between another's admission and its submission to a replica."""
    body = {"model": model_name(idle), "prompt": PROMPTS[0], "max_tokens": 256, "ignore_eos": True}

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120, headers=idle.headers) as client:
            responses = await asyncio.gather(*[client.post(idle.url + "/v1/completions", json=body)
                                               for _ in range(3 * MAX_QUEUE)])
        return [r.status_code for r in responses]

    codes = asyncio.run(burst())
    assert set(codes) == {200, 429} and codes.count(200) <= MAX_QUEUE, codes
    idle.wait_idle(timeout_s=30)
    assert sum(r["outstanding_requests"] for r in idle.status()["replicas"]) == 0


# ---- metrics ----


def test_metrics_count_requests_and_tokens(idle):
    def read():
        text = idle.get("/metrics").text
        return text, {
            "ok": metric_value(text, "hexgen_requests_total", 'endpoint="completions",status="ok"'),
            "generated": metric_value(text, "hexgen_generation_tokens_total"),
            "prompt": metric_value(text, "hexgen_prompt_tokens_total"),
            "ttft": metric_value(text, "hexgen_time_to_first_token_seconds_count"),
            "tpot": metric_value(text, "hexgen_time_per_output_token_seconds_count"),
        }

    _, before = read()
    answers = [complete(idle, p, n) for p, n in zip(PROMPTS[:3], (3, 5, 1), strict=True)]
    text, after = read()
    assert after["ok"] - before["ok"] == 3
    assert after["generated"] - before["generated"] == sum(a["usage"]["completion_tokens"] for a in answers) == 9
    assert after["prompt"] - before["prompt"] == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert after["ttft"] - before["ttft"] == 3
    assert after["tpot"] - before["tpot"] == 2  # a one-token answer has no time per output token
    idle.wait_idle(timeout_s=5)  # the replicas' own counts arrive with their heartbeats, just after the answers
    text = idle.get("/metrics").text
    for replica in ("0", "1"):
        assert metric_value(text, "hexgen_replica_up", f'replica="{replica}"') == 1.0
        assert metric_value(text, "hexgen_replica_outstanding_requests", f'replica="{replica}"') == 0.0
        assert metric_value(text, "hexgen_replica_running_sequences", f'replica="{replica}"') == 0.0
        assert metric_value(text, "hexgen_replica_waiting_sequences", f'replica="{replica}"') == 0.0
