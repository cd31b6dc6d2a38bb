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
from .validation import is_integer

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
    # dropout probabilities as the HF config gives them (GPT-2 embd/resid/attn_pdrop, Llama-family
    # attention_dropout); absent keys mean none
    embd_dropout: float = 0.0
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0
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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
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

        def need(key: str, *aliases: str) -> int:
            """A required positive integer field (the first of `key` and its aliases that is set)."""
            for name in (key, *aliases):
                if raw.get(name) is not None:
                    return _positive_int(raw, name, source)
            raise ConfigError(f"{source}: missing required field {key!r} for model_type {model_type}")

        if model_type == "gpt2":
            return cls._gpt2(raw, need, source)
        return cls._llama_like(raw, need, source, model_type)

    @classmethod
    def _gpt2(cls, raw: dict, need, source: str) -> "ModelConfig":
        hidden = need("n_embd", "hidden_size")
        heads = need("n_head", "num_attention_heads")
        if hidden % heads:
            raise ConfigError(f"{source}: n_embd={hidden} is not a multiple of n_head={heads}")
        act = raw.get("activation_function", "gelu_new")
        if not isinstance(act, str):
            raise ConfigError(f"{source}: activation_function must be a string, got {act!r}")
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
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=need("n_layer", "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=_positive_int(raw, "n_inner", source) if raw.get("n_inner") is not None else 4 * hidden,
            max_position_embeddings=need("n_positions", "max_position_embeddings"),
            norm="layernorm",
            norm_eps=_positive_float(raw, "layer_norm_epsilon", source, 1e-5),
            positions="learned",
            mlp=mlp,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            qk_norm=False,
            tie_word_embeddings=_flag(raw, "tie_word_embeddings", source, True),
            bos_token_id=_token_id(raw, "bos_token_id", source),
            eos_token_id=_token_id(raw, "eos_token_id", source),
            embd_dropout=_probability(raw, "embd_pdrop", source),
            resid_dropout=_probability(raw, "resid_pdrop", source),
            attn_dropout=_probability(raw, "attn_pdrop", source),
            raw=dict(raw),
        )

    @classmethod
    def _llama_like(cls, raw: dict, need, source: str, model_type: str) -> "ModelConfig":
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = _positive_int(raw, "num_key_value_heads", source) if raw.get("num_key_value_heads") is not None else heads
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
            raise ConfigError(f"{source}: sliding-window attention (sliding_window={sliding}, "
                              f"use_sliding_window={uses_sliding!r}) is not supported")
        layer_types = raw.get("layer_types")
        if layer_types is not None and not isinstance(layer_types, list):
            raise ConfigError(f"{source}: layer_types must be a list, got {type(layer_types).__name__}")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"{source}: layer_types other than full_attention are not supported")
        attention_bias = _flag(raw, "attention_bias", source, False)
        theta, scaling = _parse_rope(raw, source)
        if raw.get("head_dim") is None and hidden % heads:
            raise ConfigError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                              "(and there is no head_dim)")
        head_dim = _positive_int(raw, "head_dim", source) if raw.get("head_dim") is not None else hidden // heads
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim={head_dim} must be even for rotary embeddings")
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=need("intermediate_size"),
            max_position_embeddings=_positive_int(raw, "max_position_embeddings", source, 2048),
            norm="rmsnorm",
            norm_eps=_positive_float(raw, "rms_norm_eps", source, 1e-6),
            positions="rope",
            mlp="swiglu",
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=_flag(raw, "mlp_bias", source, False),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=_flag(raw, "tie_word_embeddings", source, False),
            rope_theta=theta,
            rope_scaling=scaling,
            bos_token_id=_token_id(raw, "bos_token_id", source),
            eos_token_id=_token_id(raw, "eos_token_id", source),
            attn_dropout=_probability(raw, "attention_dropout", source),
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


def _probability(raw: dict, key: str, source: str) -> float:
    """A dropout probability of the config (0 when absent)."""
    value = raw.get(key) or 0.0
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{source}: {key}={value!r} is not a probability in [0, 1)")
    return float(value)


def _parse_rope(raw: dict, source: str) -> tuple[float, RopeScaling]:
    """RoPE theta and scaling from either `rope_parameters` (transformers 5) or the hub layout; a config
    with both resolves as transformers 5 does (a non-empty `rope_scaling`, with the `rope_theta` in it or
    beside it, wins over `rope_parameters`)."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object, got {type(params).__name__}")
    legacy = raw.get("rope_scaling")
    if legacy:  # where given, transformers 5 takes the hub layout alone: rope_scaling, then its or the top rope_theta
        if not isinstance(legacy, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object, got {type(legacy).__name__} {legacy!r}")
        theta = _positive_float(legacy, "rope_theta", f"{source}: rope_scaling",
                                _positive_float(raw, "rope_theta", source, 10000.0))
        scaling, key = legacy, "rope_scaling"
    elif params:
        theta = _positive_float(params, "rope_theta", f"{source}: rope_parameters",
                                _positive_float(raw, "rope_theta", source, 10000.0))
        scaling, key = params, "rope_parameters"
    else:
        theta = _positive_float(raw, "rope_theta", source, 10000.0)
        scaling, key = raw.get("rope_scaling") or {}, "rope_scaling"
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: {key} must be an object, got {type(scaling).__name__} {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    where = f"{source}: {kind} {key}"
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=_positive_float(scaling, "factor", where))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=_positive_float(scaling, "factor", where),
            low_freq_factor=_positive_float(scaling, "low_freq_factor", where),
            high_freq_factor=_positive_float(scaling, "high_freq_factor", where),
            original_max_position_embeddings=_positive_int(scaling, "original_max_position_embeddings", where),
        )
    raise ConfigError(f"{where}: rope scaling type {kind!r} is not supported (default, linear, llama3)")


_REQUIRED = object()


def _positive_int(raw: dict, key: str, source: str, default=_REQUIRED) -> int:
    """raw[key] as an int >= 1 (integral floats accepted, as some exporters write them)."""
    value = raw.get(key, default)
    if value is _REQUIRED:
        raise ConfigError(f"{source} lacks field {key!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_integer(value) or value < 1:
        raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(raw: dict, key: str, source: str, default=_REQUIRED) -> float:
    """raw[key] as a finite float > 0."""
    value = raw.get(key, default)
    if value is _REQUIRED:
        raise ConfigError(f"{source} lacks field {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source}: {key} must be a positive number, got {value!r}")
    return float(value)


def _flag(raw: dict, key: str, source: str, default: bool) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _token_id(raw: dict, key: str, source: str) -> int | list[int] | None:
    """A special token id: null, an integer >= 0 or a list of them."""
    value = raw.get(key)
    ids = value if isinstance(value, list) else [value] if value is not None else []
    if not all(is_integer(t) and t >= 0 for t in ids):
        raise ConfigError(f"{source}: {key} must be a token id (integer >= 0) or a list of them, got {value!r}")
    return value
