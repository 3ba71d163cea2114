"""`model_config_from_hf` on config dicts as checkpoints of several transformers versions write them."""

from __future__ import annotations

import pytest

from prefixbatch.errors import ModelError
from prefixbatch.executors.native.config import RopeConfig, model_config_from_hf

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "max_position_embeddings": 4096,
}


def test_defaults_fill_what_old_configs_leave_out():
    config = model_config_from_hf(BASE)
    assert config.num_kv_heads == 8  # no num_key_value_heads: plain multi-head attention
    assert config.head_dim == 32  # derived: hidden_size / num_attention_heads
    assert config.rope == RopeConfig("default", 10000.0)
    assert config.attention_scale == 32**-0.5
    assert config.sliding_window is None and config.max_context_tokens == 4096


def test_llama31_config_written_by_transformers_4():
    rope_scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    config = model_config_from_hf(
        BASE | {"rope_theta": 500000.0, "rope_scaling": rope_scaling, "num_key_value_heads": 2}
    )
    assert config.rope == RopeConfig("llama3", 500000.0, 8.0, 1.0, 4.0, 8192)
    assert config.num_kv_heads == 2


def test_linear_rope_scaling_with_the_old_type_key():
    config = model_config_from_hf(BASE | {"rope_scaling": {"type": "linear", "factor": 2.0}})
    assert config.rope == RopeConfig("linear", 10000.0, factor=2.0)


def test_rope_parameters_written_by_transformers_5():
    config = model_config_from_hf(
        BASE | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    )
    assert config.rope == RopeConfig("default", 1e6)


def test_mistral_sliding_window_caps_the_context():
    mistral = BASE | {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "sliding_window": 1024,
        "head_dim": 64,
    }
    config = model_config_from_hf(mistral)
    assert config.max_context_tokens == 1024 and config.head_dim == 64
    assert model_config_from_hf(mistral | {"sliding_window": None}).max_context_tokens == 4096


def test_qwen_sliding_window_applies_only_when_switched_on():
    qwen2 = BASE | {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "sliding_window": 1024,
    }
    assert model_config_from_hf(qwen2).sliding_window is None
    assert model_config_from_hf(qwen2 | {"use_sliding_window": True}).max_context_tokens == 1024


def test_heads_must_divide_into_kv_heads():
    with pytest.raises(
        ModelError,
        match=r"num_attention_heads \(8\) must be a multiple of num_key_value_heads \(3\)",
    ):
        model_config_from_hf(BASE | {"num_key_value_heads": 3})


def test_architecture_list_must_match_the_model_type():
    with pytest.raises(
        ModelError,
        match=r"got model_type 'llama', architectures \['MistralForCausalLM'\]; set `executor.kind: hf`",
    ):
        model_config_from_hf(
            BASE | {"architectures": ["MistralForCausalLM"]}, source="x/config.json"
        )
