"""Memory arithmetic on a model folder, without torch: KV bytes per token, weight bytes, and
the KV budget that device memory holds."""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open

from prefixbatch.errors import ModelError
from prefixbatch.model_folder import (
    kv_budget_for_memory,
    kv_bytes_per_token,
    read_config,
    weights_bytes,
)

QWEN25_05B = {  # the shape of Qwen2.5-0.5B's config.json
    "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24,
}


def test_kv_bytes_per_token_from_the_config():
    # 2 (k, v) x 24 layers x 2 KV heads x 64 head dim x 2 bytes (bf16)
    assert kv_bytes_per_token(QWEN25_05B, 2) == 12_288
    assert kv_bytes_per_token({**QWEN25_05B, "head_dim": 128}, 4) == 2 * 24 * 2 * 128 * 4
    no_gqa = {"hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 8}
    assert kv_bytes_per_token(no_gqa, 4) == 2 * 8 * 8 * 64 * 4
    assert kv_bytes_per_token({"text_config": QWEN25_05B}, 2) == 12_288


def test_kv_budget_for_memory_keeps_a_reserve_after_the_weights():
    gib = 2**30
    # 80 GiB free, 1 GiB of weights, 10% kept: 71.1 GiB of KV at 12,288 bytes per token
    assert kv_budget_for_memory(free_bytes=80 * gib, weights_bytes=gib, bytes_per_token=12_288) == 6_212_812
    assert kv_budget_for_memory(free_bytes=10_000, weights_bytes=0, bytes_per_token=100, reserve=0.0) == 100
    with pytest.raises(ModelError, match="no room for a KV cache; .* set executor.kv_budget_tokens"):
        kv_budget_for_memory(free_bytes=gib, weights_bytes=2 * gib, bytes_per_token=12_288)


def test_weights_bytes_reads_only_the_safetensors_headers(tiny_llama):
    config = read_config(str(tiny_llama))
    count = 0
    for file in tiny_llama.glob("*.safetensors"):
        with safe_open(file, "np") as f:
            count += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    assert weights_bytes(str(tiny_llama), config, 4) == 4 * count
    assert weights_bytes(str(tiny_llama), config, 2) == 2 * count
    assert json.loads((tiny_llama / "config.json").read_text()) == config
