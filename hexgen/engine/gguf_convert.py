"""GGUF (llama.cpp) -> HF-style folder: dequantized fp32 safetensors, config.json and tokenizer."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from hexgen.errors import ConfigError

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for tensors we skip."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    match = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if match and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.weight"
    return None


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows of each head interleaved (pairs) for its RoPE; HF uses rotate-half
    order (first half, second half). Undo it: per head, rows [2i, 2i+1] go to [i, i + d/2]."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    import gguf
    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoTokenizer

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as err:  # the reader raises ValueError/struct.error/... on a damaged file
        raise ConfigError(f"{gguf_path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{gguf_path}: architecture {arch!r} is not supported; hexgen runs Llama-family GGUF files")
    num_heads = int(_field(reader, "llama.attention.head_count"))
    num_kv_heads = int(_field(reader, "llama.attention.head_count_kv") or num_heads)
    tensors: dict[str, np.ndarray] = {}
    with Progress(disable=not progress, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(f"dequantizing {gguf_path.name}", total=len(reader.tensors))
        for tensor in reader.tensors:
            name = hf_tensor_name(tensor.name)
            if name is not None:
                weight = np.ascontiguousarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
                if name.endswith("q_proj.weight"):
                    weight = unpermute_rope_rows(weight, num_heads)
                elif name.endswith("k_proj.weight"):
                    weight = unpermute_rope_rows(weight, num_kv_heads)
                tensors[name] = np.ascontiguousarray(weight)
            bar.advance(task)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        config.architectures = ["LlamaForCausalLM"]
        config.tie_word_embeddings = "lm_head.weight" not in tensors
        config.save_pretrained(str(out_dir))
        AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(str(out_dir))


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()
