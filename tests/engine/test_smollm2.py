"""The embedded SmolLM2-135M: our GGUF conversion and every layout against transformers' own GGUF loader.

All SmolLM2 tests live in this module so `--dist loadfile` loads the HF model once on one worker.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from engine_helpers import greedy_requests, hf_greedy, run_cli, run_in_process
from safetensors.torch import load_file

from hexgen.engine.checkpoint import EMBEDDED_MODELS, eos_token_ids, resolve_model
from hexgen.engine.generation import run_requests
from hexgen.engine.replica import open_local_replica
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.plan import single_replica_plan

CHAT = "What is the capital of France? Answer in one sentence."
RAW = "The three primary colors are"
MAX_NEW = 12


def embedded_gguf() -> Path:
    package, filename = EMBEDDED_MODELS["smollm2-135m"]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed")
    return Path(spec.origin).parent / filename


@pytest.fixture(scope="module")
def hf():
    """transformers' own GGUF loading (independent of hexgen's conversion): model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def source():
    return resolve_model("smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def prompts(hf):
    _, tokenizer = hf
    chat = tokenizer.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    return [list(chat), tokenizer(RAW)["input_ids"]]


@pytest.fixture(scope="module")
def hf_reference(hf, prompts):
    model, _ = hf
    return [hf_greedy(model, p, MAX_NEW) for p in prompts]


def test_converted_tensors_match_transformers_gguf_loader(hf, source):
    model, _ = hf
    ours = load_file(str(source.directory / "model.safetensors"))
    theirs = model.state_dict()
    assert set(ours) <= set(theirs)
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied: HF lists the shared tensor twice
    assert source.spec.tie_word_embeddings and model.config.tie_word_embeddings
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape, name
        torch.testing.assert_close(tensor, theirs[name], atol=1e-6, rtol=0, msg=name)


def test_converted_spec_and_tokenizer_match_transformers(hf, source, prompts):
    from transformers import AutoTokenizer

    model, _ = hf
    config = model.config
    spec = source.spec
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.vocab_size) == (
        config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
        config.vocab_size)
    assert spec.rope_theta == config.rope_parameters["rope_theta"]
    ours = AutoTokenizer.from_pretrained(str(source.directory))
    chat = ours.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"]
    assert [list(chat), ours(RAW)["input_ids"]] == prompts
    assert eos_token_ids(source.directory) == (ours.convert_tokens_to_ids("<|im_end|>"),)


def test_reference_is_not_degenerate(hf_reference):
    for tokens, _ in hf_reference:
        assert len(set(tokens)) >= 5


def test_single_process_tokens_and_logits_match_hf(source, prompts, hf_reference):
    tokens, logits = run_in_process(source, greedy_requests(prompts, MAX_NEW))
    for i, (hf_tokens, hf_logits) in enumerate(hf_reference):
        assert tokens[f"r{i}"] == hf_tokens
        torch.testing.assert_close(logits[f"r{i}"], hf_logits, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize(("tp", "layers"), [([1], [30]), ([3, 1], [20, 10]), ([1, 3], [10, 20])])
def test_layout_greedy_tokens_match_hf(tp, layers, source, prompts, hf_reference):
    replica_plan = single_replica_plan(source.spec, tp, layers).replicas[0]
    replica = open_local_replica(source, replica_plan, "float32", "cpu",
                                 SchedulerConfig(max_context=source.spec.max_context), eos_token_ids(source.directory))
    try:
        replica.start()
        completions = run_requests(replica, greedy_requests(prompts, MAX_NEW))
    finally:
        replica.close()
    assert [c.token_ids for c in completions] == [t for t, _ in hf_reference]
    assert [c.finish_reason for c in completions] == ["length", "length"]


@pytest.mark.parametrize("layout", [[], ["--tp", "3", "1", "--layers", "20", "10"]])
def test_cli_answers_the_capital_question(layout):
    code, out, err, left = run_cli(["--model", "smollm2-135m", "--chat", CHAT, "--max-new-tokens", "16", *layout])
    assert code == 0, err
    assert out == "The capital of France is Paris.\n"  # HF's greedy answer
    assert "weights loaded" in err and "ms/token" in err  # timings go to stderr only
    assert left == []
