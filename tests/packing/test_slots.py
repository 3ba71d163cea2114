"""`SlotAllocator`: first fit, coalescing frees, None when no free range is long enough."""

from __future__ import annotations

import pytest

from prefixbatch.packing import SlotAllocator, SlotRange


def test_first_fit_takes_the_lowest_range_that_is_long_enough():
    slots = SlotAllocator(10)
    assert [slots.allocate(s, n) for s, n in [(0, 3), (1, 2), (2, 3)]] == [
        SlotRange(0, 3),
        SlotRange(3, 2),
        SlotRange(5, 3),
    ]
    slots.free(0)  # 0..2 free, then 8..9
    assert slots.allocate(3, 2) == SlotRange(0, 2)  # the first range, not the exact fit at 8
    assert slots.allocate(4, 2) == SlotRange(8, 2)  # 1 slot left at 2: too short
    assert (slots.num_used_tokens, slots.num_free_tokens, slots.largest_free_range) == (9, 1, 1)
    assert slots.slots(4).stop == 10 and 4 in slots and 0 not in slots


def test_frees_coalesce_with_both_neighbours_in_any_order():
    slots = SlotAllocator(10)
    for segment in range(5):
        slots.allocate(segment, 2)
    assert slots.free(1) == SlotRange(2, 2)
    slots.free(3)
    assert slots.allocate(9, 3) is None  # 4 slots free, in two ranges of 2: fragmented
    assert slots.num_free_tokens == 4 and 9 not in slots
    slots.free(2)  # joins 1 and 3: slots 2..7
    assert slots.largest_free_range == 6
    assert slots.allocate(9, 6) == SlotRange(2, 6)
    for segment in (9, 4, 0):
        slots.free(segment)
    assert slots.largest_free_range == 10 and slots.num_used_tokens == 0
    assert slots.allocate(7, 10) == SlotRange(0, 10)


def test_a_full_store_answers_none():
    slots = SlotAllocator(4)
    slots.allocate(0, 4)
    assert slots.allocate(1, 1) is None and slots.largest_free_range == 0


def test_misuse_raises_and_names_the_segment():
    with pytest.raises(ValueError, match="`capacity_tokens` must be at least 1, got 0"):
        SlotAllocator(0)
    slots = SlotAllocator(4)
    slots.allocate(0, 2)
    with pytest.raises(
        ValueError, match=r"segment 0 already holds slots SlotRange\(start=0, num_slots=2\)"
    ):
        slots.allocate(0, 1)
    with pytest.raises(ValueError, match="`num_tokens` must be at least 1, got 0 for segment 1"):
        slots.allocate(1, 0)
    with pytest.raises(KeyError, match="segment 5 holds no slots"):
        slots.free(5)
    with pytest.raises(KeyError, match="segment 5 holds no slots"):
        slots.slots(5)
