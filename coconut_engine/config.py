"""ModelConfig: the architecture of a decoder, parsed from a Hugging Face config.json.

One dataclass describes every supported family; the differences between GPT-2, Llama, Mistral,
Qwen2 and Qwen3 are fields (norm kind, positions, MLP kind, biases, GQA, q/k norm), so the model
code has no per-family branches beyond reading them. Anything the model code does not implement is
rejected here with an error naming the config file and the field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
_GELU_TANH = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: kind is "default", "linear" or "llama3"."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only transformer (all sizes in elements)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    positions: str  # "learned" | "rope"
    mlp: str  # "gelu" | "gelu_tanh" | "swiglu"
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read `config.json` (a file or a model directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Parse a Hugging Face config dict (either the transformers-5 or the hub layout)."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        def need(key: str, *aliases: str) -> Any:
            for name in (key, *aliases):
                if raw.get(name) is not None:
                    return raw[name]
            raise ConfigError(f"{source}: missing required field {key!r} for model_type {model_type}")

        if model_type == "gpt2":
            return cls._gpt2(raw, need, source)
        return cls._llama_like(raw, need, source, model_type)

    @classmethod
    def _gpt2(cls, raw: dict, need, source: str) -> "ModelConfig":
        hidden = int(need("n_embd", "hidden_size"))
        heads = int(need("n_head", "num_attention_heads"))
        act = raw.get("activation_function", "gelu_new")
        if act in _GELU_TANH:
            mlp = "gelu_tanh"
        elif act == "gelu":
            mlp = "gelu"
        else:
            raise ConfigError(f"{source}: activation_function {act!r} is not supported for gpt2")
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if raw.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported")
        if raw.get("scale_attn_weights", True) is False:
            raise ConfigError(f"{source}: scale_attn_weights=false is not supported")
        return cls(
            model_type="gpt2",
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=int(need("n_layer", "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=int(raw.get("n_inner") or 4 * hidden),
            max_position_embeddings=int(need("n_positions", "max_position_embeddings")),
            norm="layernorm",
            norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
            positions="learned",
            mlp=mlp,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            qk_norm=False,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            raw=dict(raw),
        )

    @classmethod
    def _llama_like(cls, raw: dict, need, source: str, model_type: str) -> "ModelConfig":
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only silu)")
        sliding = raw.get("sliding_window")
        uses_sliding = raw.get("use_sliding_window", model_type == "mistral")
        if sliding is not None and uses_sliding:
            raise ConfigError(f"{source}: sliding-window attention (sliding_window={sliding}) is not supported")
        if raw.get("layer_types") and any(t != "full_attention" for t in raw["layer_types"]):
            raise ConfigError(f"{source}: layer_types other than full_attention are not supported")
        attention_bias = bool(raw.get("attention_bias", False))
        theta, scaling = _parse_rope(raw, source)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(need("intermediate_size")),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            norm="rmsnorm",
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            positions="rope",
            mlp="swiglu",
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            raw=dict(raw),
        )

    def to_dict(self) -> dict[str, Any]:
        """The HF config dict to write next to saved weights (the original, with sizes updated)."""
        out = dict(self.raw)
        out["vocab_size"] = self.vocab_size
        out["tie_word_embeddings"] = self.tie_word_embeddings
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            out["eos_token_id"] = self.eos_token_id
        return out

    def with_vocab_size(self, vocab_size: int) -> "ModelConfig":
        """A copy with a different vocabulary size (after special tokens are added)."""
        from dataclasses import replace

        return replace(self, vocab_size=vocab_size, raw=dict(self.raw))


def _parse_rope(raw: dict, source: str) -> tuple[float, RopeScaling]:
    """RoPE theta and scaling from either `rope_parameters` (transformers 5) or the hub layout."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), RopeScaling()
    if kind == "linear":
        return float(theta), RopeScaling(kind="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        try:
            return float(theta), RopeScaling(
                kind="llama3",
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        except KeyError as exc:
            raise ConfigError(f"{source}: llama3 rope scaling lacks field {exc.args[0]!r}") from exc
    raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported (default, linear, llama3)")
