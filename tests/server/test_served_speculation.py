"""`hexgen serve --speculative-tokens 4`: concurrent greedy answers equal HF transformers' (one request at a
time, no drafts), and /status and /metrics count the drafts verified and accepted. The model has small random
weights (initializer_range 0.05), so its greedy continuations fall into loops that drafts can predict."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from serve_helpers import Server, metric_value, serving, write_plan

# Phrases said twice, so the n-gram lookup has drafts to propose from the first token on.
PROMPTS = ["the cat sat on the mat. the cat sat on the mat. the cat", "one two three four one two three",
           "def f(x): return x\ndef g(x): return x\ndef"]


@pytest.fixture(scope="module")
def looping_model(chat_model_dir, tmp_path_factory):
    """(folder, HF model): a 2-layer Llama with SmolLM2's tokenizer and small random weights."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.05, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("looping-chat") / "model"
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(chat_model_dir / name, directory / name)
    return directory, model


@pytest.fixture(scope="module")
def drafting(looping_model, tmp_path_factory):
    directory, _ = looping_model
    tmp = tmp_path_factory.mktemp("serve-speculative")
    plan = write_plan(tmp / "plan.json", directory, [[([0], (0, 2))]])
    srv = Server(directory, tmp / "serve.log", "--plan", str(plan), "--speculative-tokens", "4")
    with serving(srv):
        yield srv


async def _complete_all(server: Server) -> list[str]:
    async with httpx.AsyncClient(timeout=120) as client:
        responses = await asyncio.gather(*(client.post(
            server.url + "/v1/completions", headers=server.headers,
            json={"model": server.status()["model"], "prompt": prompt, "max_tokens": 24, "temperature": 0,
                  "ignore_eos": True}) for prompt in PROMPTS))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json()["choices"][0]["text"] for r in responses]


def test_drafting_server_answers_as_transformers_without_drafts(drafting, looping_model):
    import torch

    from hexgen.tokenizer import Tokenizer

    directory, model = looping_model
    tokenizer = Tokenizer(directory)
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 pad_token_id=0)[0, ids.shape[1]:]
        expected.append(tokenizer.decode(out.tolist()))
    assert asyncio.run(_complete_all(drafting)) == expected
    drafting.wait_idle()
    (replica,) = drafting.status()["replicas"]
    assert 0 < replica["accepted_draft_tokens"] <= replica["draft_tokens"]
    metrics = drafting.get("/metrics").text
    assert metric_value(metrics, "hexgen_replica_draft_tokens", 'outcome="verified",replica="0"') == replica[
        "draft_tokens"]
