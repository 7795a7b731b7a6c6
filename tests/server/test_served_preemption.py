"""`hexgen serve` with a KV pool too small for its batch: sequences are preempted and recomputed, never failed.

One two-stage replica (TP 1 | TP 1, 2 + 2 layers) whose --memory-gb leaves each rank about POOL_BLOCKS blocks of
BLOCK_SIZE tokens. Four concurrent streams of PROMPT + MAX_TOKENS tokens need ~4 x 15 blocks at their end, so
the pool runs out mid-generation: every answer must still equal the one the engine gives the request alone,
and /status and /metrics must count the preemptions and show the pool emptied afterwards.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from serve_helpers import Server, metric_value, serving, write_plan

BLOCK_SIZE = 4
POOL_BLOCKS = 20  # about: the parent sizes the budget, each rank measures its own weights
MAX_BATCH = 4
MAX_TOKENS = 48
PROMPTS = ["Once upon a time", "The weather today is", "def fibonacci(n):", "Paris is the capital of"]


def budget_gib(model_dir) -> str:
    """--memory-gb for POOL_BLOCKS blocks beside the heavier rank's weights (the last stage: layers 2-3, its own
    LM head and the head's oneDNN copy), from the parent's own estimate of a rank's weights."""
    from hexgen.engine.checkpoint import resolve_model
    from hexgen.engine.kv_budget import GIB, RankShape, kv_bytes_per_block, rank_weight_bytes

    spec = resolve_model(str(model_dir)).spec
    ranks = [RankShape(2, 1, True, False), RankShape(2, 1, False, True)]
    need = max(rank_weight_bytes(spec, r, 4, cpu_packed=True) + POOL_BLOCKS * kv_bytes_per_block(spec, r, BLOCK_SIZE, 4)
               for r in ranks)
    return f"{need / GIB:.12f}"


@pytest.fixture(scope="module")
def tight(chat_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-preempt")
    plan = write_plan(tmp / "plan.json", chat_model_dir, [[([0], (0, 2)), ([1], (2, 4))]])
    srv = Server(
        chat_model_dir, tmp / "serve.log",
        "--plan", str(plan), "--max-batch", str(MAX_BATCH), "--block-size", str(BLOCK_SIZE),
        "--memory-gb", budget_gib(chat_model_dir), "--no-prefix-caching",
    )  # fmt: skip
    with serving(srv):
        yield srv


async def _stream(server: Server, prompt: str) -> tuple[str, str]:
    """(text, finish_reason) of one streamed greedy completion."""
    body = {"model": server.status()["model"], "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text, finish = [], None
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text.append(choice["text"])
                    finish = choice.get("finish_reason") or finish
    return "".join(text), finish


def test_a_pool_too_small_for_the_batch_preempts_and_every_answer_is_still_the_requests_alone(tight, reference):
    replica = tight.status()["replicas"][0]
    pool = replica["kv_blocks_used"] + replica["kv_blocks_free"]
    tokens_at_end = [len(reference.tokenizer.encode(p)) + MAX_TOKENS for p in PROMPTS]
    needed = sum(-(-t // BLOCK_SIZE) for t in tokens_at_end)
    assert MAX_BATCH <= pool < needed, (pool, needed)  # admitted together, and cannot all finish together

    async def run_all():
        return await asyncio.gather(*(_stream(tight, p) for p in PROMPTS))

    results = asyncio.run(run_all())
    for prompt, (text, finish) in zip(PROMPTS, results, strict=True):
        assert finish == "length"
        assert text == reference.text(prompt, MAX_TOKENS, ignore_eos=True).text  # beside others, preempted == alone

    tight.wait_idle()
    replica = tight.status()["replicas"][0]
    assert replica["preemptions"] >= 1
    assert replica["peak_running"] >= 2
    assert (replica["kv_blocks_used"], replica["kv_blocks_free"]) == (0, pool)  # every block given back
    metrics = tight.get("/metrics").text
    assert metric_value(metrics, "hexgen_replica_preemptions", 'replica="0"') == replica["preemptions"]
    assert metric_value(metrics, "hexgen_replica_kv_blocks", 'replica="0",state="free"') == pool


def test_a_request_longer_than_the_pool_is_a_400_not_a_short_answer(tight):
    """The pool holds fewer tokens a sequence than --max-context (4096): the server says so at start, takes no
    longer requests (they would have ended early with finish_reason 'length') and advertises the pool's length."""
    replica = tight.status()["replicas"][0]
    holds = (replica["kv_blocks_used"] + replica["kv_blocks_free"]) * BLOCK_SIZE
    assert (f"replica 0's KV cache holds {holds} tokens a sequence, less than the context of 4096: longer requests "
            "get a 400") in tight.log()  # the only replica
    models = tight.get("/v1/models").json()["data"][0]
    assert models["max_model_len"] == replica["max_context"] == holds
    body = {"model": tight.status()["model"], "prompt": [1, 2, 3, 4], "max_tokens": holds - 4, "temperature": 0,
            "ignore_eos": True}
    fits = tight.post("/v1/completions", body)  # exactly the pool: the whole answer
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == holds - 4
    too_long = tight.post("/v1/completions", {**body, "max_tokens": holds - 3})
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")
    assert f"at most {holds - 4}" in error["message"]


def test_a_chat_request_that_names_no_limit_runs_until_the_pool_is_full(tight):
    """OpenAI's defaults: a chat request without max_tokens generates to the end of the context, here the pool's
    (it was 16 tokens, the completions default, before); a completion without one still makes 16."""
    holds = tight.status()["replicas"][0]["max_context"]
    model = tight.status()["model"]
    chat = tight.post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                               "temperature": 0, "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    usage = chat.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == holds > usage["prompt_tokens"] + 16
    assert chat.json()["choices"][0]["finish_reason"] == "length"
    completion = tight.post("/v1/completions", {"model": model, "prompt": [1, 2, 3], "ignore_eos": True})
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 16
