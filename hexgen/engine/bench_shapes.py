"""Random-weight Llama checkpoints of a named shape, made on the benchmark's device: no download needed.

Each checkpoint comes with a word-level tokenizer of exactly its vocabulary (token i is the word `w<i>`), so
`hexgen serve` can serve it too: what it generates is random words, but every token id decodes, and the
serving benchmark's timings are those of a real model of that shape.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from hexgen.engine.checkpoint import ModelSource
from hexgen.models import load_model_spec, preset_configs

# A shape small enough for a dry run of the GPU benchmark on a CPU in seconds (GQA 4, like Llama-3-8B).
TINY_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256,
    "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1024,
    "max_position_embeddings": 4096, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


def shape_configs() -> dict[str, dict]:
    """Shape name -> HF config dict: the model presets (hexgen/data/models.json) and `tiny`."""
    return {**preset_configs(), "tiny": TINY_SHAPE}


UNKNOWN_WORD = "<unk>"  # id 0: every prompt word that is not `w<i>`


def write_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json in `directory`: whitespace-split words, id 0 = UNKNOWN_WORD, id i
    = "w<i>"; decoding joins the words with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {UNKNOWN_WORD: 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN_WORD))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"unk_token": UNKNOWN_WORD}))


def build_random_checkpoint(shape: str, dtype: torch.dtype, device: torch.device, directory: Path) -> ModelSource:
    """Initialise LlamaForCausalLM of `shape` on `device` in `dtype`, save it to `directory` as safetensors, with
    a word-level tokenizer of its vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape_configs()[shape], bos_token_id=None, eos_token_id=None, pad_token_id=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: an 8B model never exists in float32
    try:
        with torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LlamaForCausalLM(config).eval()
            model.save_pretrained(directory, max_shard_size="4GB")
    finally:
        torch.set_default_dtype(previous)
    del model
    write_word_tokenizer(directory, config.vocab_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    name = f"random {shape}"
    return ModelSource(name, directory, replace(load_model_spec(str(directory)), name=name))
