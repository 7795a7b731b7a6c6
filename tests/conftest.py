"""Shared test setup: a repo-local model cache, the `gpu` marker's skip, and small random Llama checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Before anything resolves a model: the embedded GGUF is converted once into this git-ignored folder.
os.environ.setdefault("HEXGEN_CACHE_DIR", str(REPO_ROOT / ".hexgen-cache"))


def _cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Triton reads TRITON_INTERPRET when a kernel is defined, and other imports load triton early (transformers' Llama
# modelling pulls in torch's inductor, which imports it): so the kernel tests' interpreter mode is chosen here,
# before any test module is collected, not in tests/kernels/conftest.py alone (a worker that collected such a
# module first then failed every interpreted kernel with "Cannot call @triton.jit'd outside of ... a kernel").
if not _cuda_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def cuda_device_count() -> int:
    if not _cuda_visible():
        return 0
    import torch

    return torch.cuda.device_count()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and cuda_device_count() == 0:
        skip = pytest.mark.skip(reason="needs CUDA; no GPU visible")
        for item in gpu_items:
            item.add_marker(skip)


# name -> LlamaConfig keyword arguments. A large initializer_range makes greedy continuations of a
# random model diverse instead of one repeated token; eos/bos are None so nothing stops early.
TINY_CONFIGS: dict[str, dict] = {
    # 8 heads / 4 key-value heads (GQA), untied head
    "gqa": dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
    # lm_head shares the embedding
    "tied": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Llama-3 RoPE scaling. head_dim 16, theta 1e4: wavelengths 6.3, 20 (kept), 63 (smoothed), >= 199 (divided)
    "rope3": dict(vocab_size=288, hidden_size=128, intermediate_size=192, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 128,
                                   "rope_theta": 10000.0}),
    # vocabulary not divisible by TP 4 (250 = 4 * 63 - 2): the last shard is padded
    "odd_vocab": dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
}


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Random-weight LlamaForCausalLM checkpoints saved with save_pretrained, one folder per TINY_CONFIGS entry."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-llamas")
    dirs = {}
    for seed, (name, kwargs) in enumerate(TINY_CONFIGS.items()):
        torch.manual_seed(1000 + seed)
        config = LlamaConfig(**kwargs, max_position_embeddings=256, initializer_range=0.3, rms_norm_eps=1e-5,
                             bos_token_id=None, eos_token_id=None, pad_token_id=None)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():  # random norm weights too, so a wrong norm cannot hide behind all-ones
            for module_name, param in model.named_parameters():
                if module_name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="session")
def tokenizer_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer (so text prompts work) and a
    context of 64 tokens; the tokenizer files come from the converted embedded model."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hexgen.engine.checkpoint import resolve_model

    tokenizer_source = resolve_model("smollm2-135m", progress=False).directory
    directory = tmp_path_factory.mktemp("tokenizer-llama") / "model"
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, directory / name)
    return directory
