"""Checkpoint forms: a sharded safetensors folder (index + several files) and a .gguf path given directly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from engine_helpers import greedy_requests, hf_greedy, load_hf, random_prompts, run_in_process

from hexgen.engine.checkpoint import embedded_gguf_path, resolve_model
from hexgen.engine.weights import INDEX_FILE, CheckpointReader
from hexgen.errors import ConfigError


@pytest.fixture(scope="module")
def sharded_dir(tiny_model_dirs, tmp_path_factory):
    """The `gqa` tiny model saved again by transformers in shards of at most 100 KB."""
    directory = tmp_path_factory.mktemp("sharded") / "gqa"
    load_hf(tiny_model_dirs["gqa"]).save_pretrained(directory, max_shard_size="100KB")
    return directory


def test_sharded_checkpoint_matches_transformers(sharded_dir):
    index = json.loads((sharded_dir / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2  # really spread over several files
    source = resolve_model(str(sharded_dir))
    prompts = random_prompts(source.spec.vocab_size, [5, 9], seed=3)
    tokens, logits = run_in_process(source, greedy_requests(prompts, 6))
    model = load_hf(sharded_dir)
    for i, prompt in enumerate(prompts):
        ref_tokens, ref_logits = hf_greedy(model, prompt, 6)
        assert tokens[f"r{i}"] == ref_tokens
        torch.testing.assert_close(logits[f"r{i}"], ref_logits, atol=1e-4, rtol=1e-4)


def test_missing_shard_is_named(sharded_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_dir, broken)
    index = json.loads((broken / INDEX_FILE).read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (broken / lost).unlink()
    with pytest.raises(ConfigError, match=lost):
        CheckpointReader(broken, torch.float32)


def test_gguf_path_resolves_like_the_embedded_alias():
    by_alias = resolve_model("smollm2-135m", progress=False)
    by_path = resolve_model(str(embedded_gguf_path("smollm2-135m")), progress=False)
    assert by_path.directory == by_alias.directory  # one conversion cache entry per GGUF file
    assert (by_path.spec.num_layers, by_path.spec.num_heads, by_path.spec.vocab_size) == (30, 9, 49152)
