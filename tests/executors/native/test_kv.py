"""`KVStore`: slot ranges by segment, the token budget, and reads of what was written."""

from __future__ import annotations

import pytest
import torch

from prefixbatch.executors.native.config import model_config_from_hf
from prefixbatch.executors.native.kv import KVStore, SlotRange


def make_store(capacity_tokens: int = 10) -> KVStore:
    return KVStore(
        num_layers=2,
        num_kv_heads=2,
        head_dim=4,
        capacity_tokens=capacity_tokens,
        dtype=torch.float32,
        device="cpu",
    )


def test_allocations_are_contiguous_and_counted():
    store = make_store()
    assert store.allocate(7, 4) == SlotRange(0, 4)
    assert store.allocate(8, 3) == SlotRange(4, 3)
    assert (store.num_used_tokens, store.num_free_tokens, store.largest_free_range) == (7, 3, 3)
    assert store.slots(8).stop == 7 and 7 in store and 9 not in store


def test_what_does_not_fit_is_none_and_changes_nothing():
    store = make_store()
    store.allocate(0, 8)
    assert store.allocate(1, 3) is None
    assert 1 not in store and store.num_free_tokens == 2


def test_fragmented_space_is_none_until_neighbours_coalesce():
    store = make_store()
    for segment in range(5):
        store.allocate(segment, 2)
    store.free(1)
    store.free(3)
    assert store.num_free_tokens == 4 and store.largest_free_range == 2
    assert store.allocate(9, 3) is None  # 4 tokens free, but not in one range
    store.free(2)  # joins 1 and 3 into slots 2..7
    assert store.allocate(9, 6) == SlotRange(2, 6)
    store.free(0)
    store.free(4)
    store.free(9)
    assert store.largest_free_range == 10


def test_first_fit_reuses_the_lowest_range():
    store = make_store()
    store.allocate(0, 3)
    store.allocate(1, 3)
    store.free(0)
    assert store.allocate(2, 2) == SlotRange(0, 2)
    assert store.allocate(3, 2) == SlotRange(6, 2)


def test_misuse_raises():
    store = make_store()
    store.allocate(0, 2)
    with pytest.raises(ValueError, match="segment 0 already holds slots"):
        store.allocate(0, 2)
    with pytest.raises(ValueError, match="`num_tokens` must be at least 1, got 0"):
        store.allocate(1, 0)
    with pytest.raises(KeyError, match="segment 5 holds no slots"):
        store.free(5)


def test_written_kv_reads_back_per_segment_and_layer():
    store = make_store()
    store.allocate(0, 3)
    slots = store.allocate(1, 4)
    k = torch.arange(2 * 2 * 4, dtype=torch.float32).view(2, 2, 4)
    store.write(1, torch.tensor([slots.start + 1, slots.start + 2]), k, -k)
    keys, values = store.segment_kv(1, 1, num_tokens=3)
    assert keys.shape == (3, 2, 4)
    assert torch.equal(keys[1:], k) and torch.equal(values[1:], -k)
    assert torch.equal(keys[0], torch.zeros(2, 4))
    assert store.keys[0].abs().sum() == 0  # the other layer untouched


def test_bytes_per_token():
    config = model_config_from_hf(
        {
            "model_type": "llama",
            "vocab_size": 10,
            "hidden_size": 64,
            "intermediate_size": 8,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    # K and V × 3 layers × 2 kv heads × 16 dims × 2 bytes
    assert KVStore.bytes_per_token(config, torch.bfloat16) == 2 * 3 * 2 * 16 * 2


def test_a_new_store_reuses_a_large_enough_buffer_zeroed():
    first = make_store(10)
    first.keys.fill_(1.0)
    first.values.fill_(2.0)
    smaller = KVStore(num_layers=2, num_kv_heads=2, head_dim=4, capacity_tokens=6, dtype=torch.float32,
                      device="cpu", buffer=first.buffer)
    assert smaller.keys.data_ptr() == first.buffer.data_ptr()  # the same memory, no new allocation
    assert smaller.keys.shape == (2, 6, 2, 4) and smaller.keys.is_contiguous() and smaller.values.is_contiguous()
    assert not smaller.keys.any() and not smaller.values.any()  # every slot starts at zero again
    larger = KVStore(num_layers=2, num_kv_heads=2, head_dim=4, capacity_tokens=20, dtype=torch.float32,
                     device="cpu", buffer=first.buffer)
    assert larger.buffer.data_ptr() != first.buffer.data_ptr() and larger.buffer.numel() == 2 * 2 * 20 * 2 * 4
