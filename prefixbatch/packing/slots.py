"""KV accounting by segment: a first-fit allocator of contiguous slot ranges, no memory behind it.

The store (`executors.native.kv.KVStore`) owns the tensors; this owns which slots are whose.
A segment (a tree node's tokens, or a sequence's own generated tokens) holds one contiguous
range `[start, start + num_slots)`, reserved whole and never grown, so its keys are one slice
of every layer's buffer.

Invariants: the free list is sorted by start and coalesced (no two free ranges touch), so it
is the exact complement of the held ranges whatever order they were freed in; held and free
ranges together tile `[0, capacity_tokens)`. First fit keeps depth-first, freed-whole groups
mostly stack-like, and `None` (does not fit) can mean fragmentation: `largest_free_range`
tells it from a full store.

in → out: segment id + token count → `SlotRange`, or None when no free range is that long.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

__all__ = ["SlotAllocator", "SlotRange"]


@dataclass(frozen=True)
class SlotRange:
    """Slots [start, stop) of the store, the same in every layer."""

    start: int
    num_slots: int

    @property
    def stop(self) -> int:
        return self.start + self.num_slots


class SlotAllocator:
    """First-fit contiguous slot ranges by segment id, within `capacity_tokens` slots."""

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens < 1:
            raise ValueError(f"`capacity_tokens` must be at least 1, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self._free: list[SlotRange] = [SlotRange(0, capacity_tokens)]  # sorted by start, coalesced
        self._held: dict[int, SlotRange] = {}
        self._num_used = 0  # kept as a count: read on every admission

    @property
    def num_used_tokens(self) -> int:
        return self._num_used

    @property
    def num_free_tokens(self) -> int:
        return self.capacity_tokens - self._num_used

    @property
    def largest_free_range(self) -> int:
        """The most tokens one `allocate` can get now."""
        return max((r.num_slots for r in self._free), default=0)

    def __contains__(self, segment_id: int) -> bool:
        return segment_id in self._held

    def allocate(self, segment_id: int, num_tokens: int) -> SlotRange | None:
        """Reserves `num_tokens` contiguous slots for a new segment; None if no free range fits."""
        if segment_id in self._held:
            raise ValueError(f"segment {segment_id} already holds slots {self._held[segment_id]}")
        if num_tokens < 1:
            raise ValueError(
                f"`num_tokens` must be at least 1, got {num_tokens} for segment {segment_id}"
            )
        index = next((i for i, r in enumerate(self._free) if r.num_slots >= num_tokens), None)
        if index is None:
            return None
        free = self._free[index]
        taken = SlotRange(free.start, num_tokens)
        if free.num_slots == num_tokens:
            del self._free[index]
        else:
            self._free[index] = SlotRange(taken.stop, free.num_slots - num_tokens)
        self._held[segment_id] = taken
        self._num_used += num_tokens
        return taken

    def free(self, segment_id: int) -> SlotRange:
        """Returns a segment's slots to the free list, merged with free neighbours."""
        released = self._held.pop(segment_id, None)
        if released is None:
            raise KeyError(f"segment {segment_id} holds no slots")
        self._num_used -= released.num_slots
        index = bisect.bisect(self._free, released.start, key=lambda r: r.start)
        self._free.insert(index, released)
        # Merge with the right neighbour first, so `index` still points at `released`.
        if index + 1 < len(self._free) and self._free[index + 1].start == released.stop:
            right = self._free.pop(index + 1)
            self._free[index] = SlotRange(released.start, released.num_slots + right.num_slots)
        if index > 0 and self._free[index - 1].stop == self._free[index].start:
            merged = self._free.pop(index)
            left = self._free[index - 1]
            self._free[index - 1] = SlotRange(left.start, left.num_slots + merged.num_slots)
        return released

    def slots(self, segment_id: int) -> SlotRange:
        """The slot range a segment holds."""
        slot_range = self._held.get(segment_id)
        if slot_range is None:
            raise KeyError(f"segment {segment_id} holds no slots")
        return slot_range
