"""KV storage by segment: one preallocated buffer per layer, a contiguous slot range per segment.

Layout: `keys` and `values` are each `[num_layers, capacity_tokens, Hkv, D]`, allocated
once. A segment (a tree node's shared tokens, or a sequence's own suffix + output) owns one
contiguous range of slots, the same range in every layer, reserved whole when allocated.
Which slots are whose is plain data, `packing.slots.SlotAllocator` (`allocator`), shared
with the step scheduler that admits groups against it; this owns the tensors.

Why contiguous ranges rather than fixed-size blocks (paged KV):
- A segment's keys are one slice, `keys[layer, start:stop]`, a view: the attention of all
  queries under a node reads the node's KV in place with one matrix product, with no gather
  per layer per step (blocks would need one, or a paged kernel).
- The planner knows every segment's final length when it admits a group (shared segments
  exactly; a sequence's own segment as suffix + max_tokens), so a segment never grows past
  its reservation and nothing has to be moved.
- The cost is external fragmentation: `allocate` can answer `None` while
  `num_free_tokens` would suffice. Groups run in depth-first order and are freed whole, so
  allocations are mostly nested (stack-like) and freed ranges coalesce. `largest_free_range`
  lets the caller tell "wait for a free" from "can never fit".

Memory is counted in tokens: `capacity_tokens` is the budget; `bytes_per_token` converts a
memory budget into it. Slots are zero-initialised, so a bug that reads an unwritten slot
gives wrong finite numbers that the tests catch, rather than nan.

in → out: segment id + token count → `SlotRange` (or None: does not fit); k, v → slots.
"""

from __future__ import annotations

import torch

from prefixbatch.executors.native.config import ModelConfig
from prefixbatch.packing.slots import SlotAllocator, SlotRange

__all__ = ["KVStore", "SlotRange"]


class KVStore:
    """Per-layer K/V buffers, and which slots are whose (`packing.slots.SlotAllocator`)."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
        buffer: torch.Tensor | None = None,
    ) -> None:
        if capacity_tokens < 1:
            raise ValueError(f"`capacity_tokens` must be at least 1, got {capacity_tokens}")
        shape = (num_layers, capacity_tokens, num_kv_heads, head_dim)
        size = num_layers * capacity_tokens * num_kv_heads * head_dim
        is_reusable = buffer is not None and buffer.numel() >= 2 * size and buffer.dtype == dtype
        if not (is_reusable and _on(buffer, device)):
            buffer = torch.empty(2 * size, dtype=dtype, device=device)
        self.buffer = buffer  # keys and values are views of it; a later store may reuse it
        self.keys = buffer[:size].view(shape).zero_()  # [L, capacity, Hkv, D]
        self.values = buffer[size : 2 * size].view(shape).zero_()  # [L, capacity, Hkv, D]
        self.capacity_tokens = capacity_tokens
        # The bookkeeping is plain data, so the step scheduler admits groups against it directly.
        self.allocator = SlotAllocator(capacity_tokens)

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        *,
        capacity_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
        buffer: torch.Tensor | None = None,
    ) -> KVStore:
        """A store for `config`'s layers: in `buffer` (zeroed) when it is large enough, else new."""
        return cls(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            capacity_tokens=capacity_tokens,
            dtype=dtype,
            device=device,
            buffer=buffer,
        )

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """Memory one token's K and V take over all layers."""
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element_size

    @property
    def num_used_tokens(self) -> int:
        return self.allocator.num_used_tokens

    @property
    def num_free_tokens(self) -> int:
        return self.allocator.num_free_tokens

    @property
    def largest_free_range(self) -> int:
        """The most tokens one `allocate` can get now."""
        return self.allocator.largest_free_range

    def __contains__(self, segment_id: int) -> bool:
        return segment_id in self.allocator

    def allocate(self, segment_id: int, num_tokens: int) -> SlotRange | None:
        """Reserves `num_tokens` contiguous slots for a new segment; None if no free range fits."""
        return self.allocator.allocate(segment_id, num_tokens)

    def free(self, segment_id: int) -> None:
        """Returns a segment's slots to the free list, merged with free neighbours."""
        self.allocator.free(segment_id)

    def slots(self, segment_id: int) -> SlotRange:
        """The slot range a segment holds."""
        return self.allocator.slots(segment_id)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v: [T, Hkv, D] at slots [T] (int64, on the store's device) of one layer."""
        self.keys[layer].index_copy_(0, slots, k)
        self.values[layer].index_copy_(0, slots, v)

    def segment_kv(
        self, layer: int, segment_id: int, num_tokens: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (k, v): [n, Hkv, D] of a segment's first n slots (all of them when None)."""
        slot_range = self.slots(segment_id)
        stop = slot_range.stop if num_tokens is None else slot_range.start + num_tokens
        assert stop <= slot_range.stop, (
            f"segment {segment_id} holds {slot_range.num_slots} slots, asked for {num_tokens}"
        )
        return self.keys[layer, slot_range.start : stop], self.values[
            layer, slot_range.start : stop
        ]


def _on(tensor: torch.Tensor, device: torch.device | str) -> bool:
    """Whether `tensor` lives on `device` ("cuda" means the current CUDA device)."""
    want = torch.device(device)
    if want.type == "cuda" and want.index is None:
        want = torch.device("cuda", torch.cuda.current_device())
    return tensor.device == want
