"""The native model's shape, read from a Hugging Face `config.json`, frozen once built.

One `ModelConfig` describes every architecture of the Llama family we implement; the
differences between them are a handful of flags (biases, q/k norm, tied embeddings) and the
rope variant. Anything a checkpoint asks for that these flags cannot express is refused here
with a `ModelError` that names the `hf` executor as the fallback, so an unsupported model
never runs with silently wrong numbers.

Invariants:
- `num_attention_heads % num_kv_heads == 0` (GQA; 1 kv head is MQA).
- `max_context_tokens` is the longest context whose attention is plain full causal
  attention: for a model with a sliding window it is capped at the window, because within
  the window sliding and full attention are the same thing.

in → out: config.json (a dict) → `ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefixbatch.errors import ModelError

__all__ = ["ModelConfig", "RopeConfig", "model_config_from_hf"]

RopeType = Literal["default", "linear", "llama3"]

# model_type → the one architecture name a causal-LM checkpoint of that type lists.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
FALLBACK = "set `executor.kind: hf` to run it with transformers instead"


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: `default`, or one of the position-stretching variants."""

    rope_type: RopeType
    theta: float  # base of the frequencies
    factor: float = 1.0  # linear / llama3: how much longer the context is than in training
    # llama3 only: wavelengths between these bands are interpolated smoothly.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Everything the native model needs to build its modules and run them."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    sliding_window: int | None  # None: full attention at any length
    tie_word_embeddings: bool  # lm_head shares the embedding matrix
    qkv_bias: bool  # q/k/v projections have biases (Qwen2; Llama/Qwen3 with attention_bias)
    o_bias: bool  # output projection has a bias (Llama/Qwen3 with attention_bias)
    mlp_bias: bool  # gate/up/down have biases (Llama with mlp_bias)
    qk_norm: bool  # RMSNorm over each head of q and k before rope (Qwen3)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            msg = f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            raise ModelError(msg)

    @property
    def attention_scale(self) -> float:
        """Multiplies q·k before the softmax."""
        return self.head_dim**-0.5

    @property
    def max_context_tokens(self) -> int:
        """Longest context (prompt + output) this implementation runs exactly."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)


def model_config_from_hf(config: dict, *, source: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a Hugging Face config dict; `source` names it in error messages."""
    model_type = _check_architecture(config, source)
    _check_activation(config, source)
    num_heads = config["num_attention_heads"]
    attention_bias = bool(config.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        # Mistral Nemo and Qwen3 give head_dim explicitly and it differs from the quotient.
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope=_rope_config(config, source),
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        sliding_window=_sliding_window(config, model_type),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases and never an o_proj bias, whatever attention_bias says.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=model_type == "llama" and bool(config.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
    )


def _check_architecture(config: dict, source: str) -> str:
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    expected = ARCHITECTURES.get(model_type)
    if expected is None or any(name != expected for name in architectures):
        msg = (
            f"{source}: the native executor implements {sorted(ARCHITECTURES.values())}, "
            f"got model_type {model_type!r}, architectures {architectures}; {FALLBACK}"
        )
        raise ModelError(msg)
    return model_type


def _check_activation(config: dict, source: str) -> None:
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        msg = f"{source}: hidden_act must be 'silu' for the native executor, got {activation!r}; {FALLBACK}"
        raise ModelError(msg)


def _rope_config(config: dict, source: str) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older checkpoints have a
    # top-level `rope_theta` and an optional `rope_scaling` whose kind is `type` or `rope_type`.
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RopeConfig("default", theta)
    if rope_type == "linear":
        return RopeConfig("linear", theta, factor=params["factor"])
    if rope_type == "llama3":
        return RopeConfig(
            "llama3",
            theta,
            factor=params["factor"],
            low_freq_factor=params["low_freq_factor"],
            high_freq_factor=params["high_freq_factor"],
            original_max_position_embeddings=params["original_max_position_embeddings"],
        )
    msg = f"{source}: rope type must be one of ['default', 'linear', 'llama3'] for the native executor, got {rope_type!r}; {FALLBACK}"
    raise ModelError(msg)


def _sliding_window(config: dict, model_type: str) -> int | None:
    # Qwen2/3 list a window but switch it on only with use_sliding_window (off by default);
    # Mistral's window applies whenever it is set.
    if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        return None
    window = config.get("sliding_window")
    return window if isinstance(window, int) and window > 0 else None
