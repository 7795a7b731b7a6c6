"""Llama-family model shapes from a Hugging Face config.json or a named preset (no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from hexgen.errors import ConfigError
from hexgen.folders import read_text

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3-style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a Llama-family decoder that the engine, planner and cost model need."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_scaling: RopeScaling | None = None

    @property
    def kv_dim(self) -> int:
        """Width of one K (or V) projection: key/value heads x head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        """Weights of one decoder layer: attention (q, k, v, o), SwiGLU MLP and two RMSNorms."""
        h = self.hidden_size
        attention = h * self.num_heads * self.head_dim * 2 + h * self.kv_dim * 2
        mlp = 3 * h * self.intermediate_size
        return attention + mlp + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + self.num_layers * self.params_per_layer + self.hidden_size + head

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V cache of one token in one layer, all key/value heads (divide by TP for a shard)."""
        return 2 * self.kv_dim * dtype_bytes

    def valid_tp_degrees(self, max_degree: int = 64) -> list[int]:
        """TP degrees that divide both the attention-head and the key/value-head counts."""
        return [t for t in range(1, max_degree + 1) if self.num_heads % t == 0 and self.num_kv_heads % t == 0]

    def check_tp_degree(self, tp_degree: int) -> None:
        if tp_degree < 1 or self.num_heads % tp_degree or self.num_kv_heads % tp_degree:
            raise ConfigError(
                f"TP degree {tp_degree} does not divide {self.name}'s {self.num_heads} attention heads and "
                f"{self.num_kv_heads} key/value heads; valid degrees: {self.valid_tp_degrees()}"
            )


def spec_from_hf_config(config: dict[str, Any], name: str) -> ModelSpec:
    """Build a ModelSpec from the dict of an HF config.json; refuse architectures we do not run."""
    if not isinstance(config, dict):
        raise ConfigError(f"{name}: a config.json is an object of the model's settings")
    archs = config.get("architectures") or []
    if archs and archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{name}: architecture {archs[0]!r} is not supported; hexgen runs Llama-family decoders "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{name}: model_type {config.get('model_type')!r} is not supported; hexgen runs Llama-family decoders "
            f"(model_type {' or '.join(map(repr, SUPPORTED_MODEL_TYPES))})"
        )
    for unsupported in ("attention_bias", "mlp_bias"):
        if config.get(unsupported):
            raise ConfigError(f"{name}: {unsupported}=true is not supported (Llama weights have no biases)")
    if config.get("sliding_window"):
        raise ConfigError(f"{name}: sliding-window attention is not supported")
    try:
        def size(key: str, default: Any = None) -> int:
            value = config[key] if default is None else (config.get(key) or default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: {key} must be a positive integer, got {json.dumps(value)}")
            return value

        num_heads, hidden = size("num_attention_heads"), size("hidden_size")
        num_kv_heads = size("num_key_value_heads", num_heads)
        if num_heads % num_kv_heads:
            raise ConfigError(f"{name}: num_key_value_heads {num_kv_heads} does not divide num_attention_heads "
                              f"{num_heads}")
        if "head_dim" not in config and hidden % num_heads:
            raise ConfigError(f"{name}: num_attention_heads {num_heads} does not divide hidden_size {hidden} (and "
                              "no head_dim is given)")
        return ModelSpec(
            name=name,
            num_layers=size("num_hidden_layers"),
            hidden_size=hidden,
            intermediate_size=size("intermediate_size"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=size("head_dim", hidden // num_heads),
            vocab_size=size("vocab_size"),
            max_context=size("max_position_embeddings", 2048),
            rope_theta=float(config.get("rope_theta") or _rope_parameters(config).get("rope_theta", 10000.0)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_scaling=_rope_scaling(config, name),
        )
    except KeyError as missing:
        raise ConfigError(f"{name}: config.json lacks the field {missing.args[0]!r}") from None


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes "rope_parameters"; older configs write "rope_scaling" and "rope_theta".
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _rope_scaling(config: dict[str, Any], name: str) -> RopeScaling | None:
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ConfigError(f"{name}: rope_type {rope_type!r} is not supported; use 'default' or 'llama3'")
    return RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def preset_configs() -> dict[str, dict[str, Any]]:
    """Named presets as HF config dicts (hexgen/data/models.json)."""
    text = resources.files("hexgen").joinpath("data/models.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def load_model_spec(name_or_path: str) -> ModelSpec:
    """A preset name, a directory holding config.json, or a config.json path."""
    presets = preset_configs()
    if name_or_path in presets:
        return spec_from_hf_config(presets[name_or_path], name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model {name_or_path!r} is neither a preset ({', '.join(sorted(presets))}) "
            "nor a directory or file holding a config.json"
        )
    try:
        config = json.loads(read_text(path, "model config", ConfigError))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not a readable JSON config ({err})") from None
    return spec_from_hf_config(config, str(name_or_path))
