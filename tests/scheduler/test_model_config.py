"""A model's config.json read into its shape: presets against their published sizes, mistakes named one by one."""

from __future__ import annotations

import json

import pytest

from hexgen.errors import ConfigError
from hexgen.models import load_model_spec, spec_from_hf_config

GOOD = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}


def test_presets_have_their_published_sizes():
    """Parameter counts by hand from the published shapes (embedding + layers + final norm + untied head)."""
    llama2_7b = load_model_spec("llama-2-7b")
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert llama2_7b.num_params == 2 * 32000 * 4096 + 32 * per_layer + 4096  # 6.74 B
    smol = load_model_spec("smollm2-135m")
    assert (smol.num_layers, smol.num_heads, smol.num_kv_heads, smol.head_dim) == (30, 9, 3, 64)


def test_a_good_config_and_its_defaults():
    spec = spec_from_hf_config({k: v for k, v in GOOD.items() if k != "num_key_value_heads"}, "m")
    assert (spec.num_kv_heads, spec.head_dim, spec.max_context) == (4, 16, 2048)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
    # a Llama architecture without a model_type was refused as "architecture 'LlamaForCausalLM' is not supported"
    ({"model_type": None}, "model_type None is not supported; hexgen runs Llama-family decoders (model_type 'llama'"),
    # these were taken as they came (0 layers, a float width, a bool as 1) or failed deep in the planner
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"hidden_size": 64.5}, "hidden_size must be a positive integer, got 64.5"),
    ({"vocab_size": True}, "vocab_size must be a positive integer, got true"),
    ({"intermediate_size": "128"}, 'intermediate_size must be a positive integer, got "128"'),
    ({"num_attention_heads": 6}, "num_attention_heads 6 does not divide hidden_size 64"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4"),
    ({"vocab_size": None}, "vocab_size must be a positive integer, got null"),
])
def test_config_mistakes_are_named(change, message):
    with pytest.raises(ConfigError) as err:
        spec_from_hf_config({**GOOD, **change}, "m")
    assert message in str(err.value)


def test_a_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps([GOOD]))
    with pytest.raises(ConfigError, match="a config.json is an object of the model's settings"):
        load_model_spec(str(tmp_path))


def test_a_missing_field_is_named():
    with pytest.raises(ConfigError, match="config.json lacks the field 'hidden_size'"):
        spec_from_hf_config({k: v for k, v in GOOD.items() if k != "hidden_size"}, "m")
