"""Batch-invariant numerics: a row's logits depend on its own tokens only, to the last bit.

The default engine's rounding depends on what a token is computed with: the BLAS picks
another kernel for a matmul of 5 rows than of 64, tree attention splits a row's keys into
spans by the shape of the prefix tree and of the step, and a prefill chunk attends through
another kernel than a decode token. Each is exact arithmetic up to fp32 rounding (~1e-5),
and greedy decoding does not notice; a seeded sample does, about once in ten thousand
tokens, when its uniform number lands within that rounding of a boundary between two
tokens. Then the same request draws another completion when its batch mates differ, or
when a resumed run recomputes its checkpointed tokens by prefill instead of decode.

With `executor.native.batch_invariant`, every operation a token goes through is made
independent of the step around it:
- dense layers see a row count rounded up to `ROW_MULTIPLE` (padding rows are computed and
  thrown away): the BLAS then runs the same kernel on every row, whatever the step's size;
- attention gathers each row's whole context (ancestor segments, then its own segment up to
  itself) in position order, cuts it into blocks of `KEY_BLOCK` keys aligned to position 0,
  computes each block with fixed-size products, and merges the blocks by a running sum in
  position order (`cumsum` adds left to right; the padding blocks add exact zeros). Its
  products are batched over rows rounded up to `ROW_MULTIPLE` too (MKL's batched matmul
  takes another path for a batch of one row and one block). A row's keys and the order
  they are summed in are the same in a prefill chunk and in decode, alone or beside others.
The price: attention reads each row's keys on its own (no shared-prefix product; the
prefix's KV is still computed and stored once) and dense layers compute up to 15 padding
rows. Verified bit for bit on the CPU (MKL); CUDA's BLAS picks split-K kernels by shape, so
the setting is refused there (see `executor.config`).

in → out: the step's `AttentionPlan` → per-row context slots; q + the layer's KV → out.
"""

from __future__ import annotations

import numpy as np
import torch

from prefixbatch.executors.native.attention_plan import AttentionPlan
from prefixbatch.executors.native.kv import KVStore

__all__ = ["KEY_BLOCK", "ROW_MULTIPLE", "InvariantAttention", "blocked_attention", "context_slots"]

ROW_MULTIPLE = 16  # dense layers' row count is a multiple of this (the BLAS's row blocking)
KEY_BLOCK = 64  # keys per attention block (a multiple of every SIMD width)


def padded_rows(num_rows: int) -> int:
    return -(-num_rows // ROW_MULTIPLE) * ROW_MULTIPLE


def context_slots(plan: AttentionPlan) -> tuple[np.ndarray, np.ndarray]:
    """Each row's context as store slots in position order, padded to whole `KEY_BLOCK`s.

    → (slots [T', L] int64, valid [T', L] bool): T' = `padded_rows(T)` (padding rows see no
    key), L a multiple of KEY_BLOCK. Ancestor spans come first in the plan, root first, so
    appending spans in plan order is position order."""
    ranges: list[list[tuple[int, int]]] = [[] for _ in range(plan.num_rows)]
    for span in plan.spans:
        for i, row in enumerate(span.rows):
            visible = span.num_keys if span.causal_offset is None else span.causal_offset + i + 1
            ranges[row].append((span.key_start, span.key_start + visible))
    lengths = [sum(stop - start for start, stop in row) for row in ranges]
    for row, length in enumerate(lengths):  # a row sees exactly the tokens before it, and itself
        assert length == plan.positions[row] + 1, (row, length, plan.positions[row])
    width = max(-(-max(lengths, default=1) // KEY_BLOCK) * KEY_BLOCK, KEY_BLOCK)
    slots = np.zeros((padded_rows(plan.num_rows), width), np.int64)
    valid = np.zeros(slots.shape, bool)
    for row, row_ranges in enumerate(ranges):
        slots[row, : lengths[row]] = np.concatenate([np.arange(a, b) for a, b in row_ranges])
        valid[row, : lengths[row]] = True
    return slots, valid


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """q [R, H, D]; k, v [R, L, Hkv, D] (each row's context, L = nb · KEY_BLOCK); valid [R, L]
    → out [R, H, D] fp32, each row computed the same whatever L beyond its own keys, and
    whatever R ≥ ROW_MULTIPLE (rows without a valid key come out 0)."""
    num_rows, num_heads, head_dim = q.shape
    width, num_kv_heads = k.shape[1], k.shape[2]
    group, num_blocks = num_heads // num_kv_heads, width // KEY_BLOCK
    q_grouped = q.float().view(num_rows, num_kv_heads, group, head_dim)  # [R, Hkv, G, D]
    # [R, Hkv, nb, B, D]: each block one fixed-size product per (row, kv head).
    k_blocks = k.float().view(num_rows, num_blocks, KEY_BLOCK, num_kv_heads, head_dim)
    k_blocks = k_blocks.permute(0, 3, 1, 2, 4)
    v_blocks = v.float().view(num_rows, num_blocks, KEY_BLOCK, num_kv_heads, head_dim)
    v_blocks = v_blocks.permute(0, 3, 1, 2, 4)
    # scores [R, Hkv, nb, G, B]
    scores = torch.matmul(q_grouped[:, :, None], k_blocks.transpose(-1, -2)) * scale
    mask = valid.view(num_rows, 1, num_blocks, 1, KEY_BLOCK)
    scores = scores.masked_fill(~mask, float("-inf"))
    block_max = scores.amax(dim=-1, keepdim=True)  # [R, Hkv, nb, G, 1]; -inf: no key
    block_max = torch.where(torch.isfinite(block_max), block_max, torch.zeros_like(block_max))
    exps = torch.exp(scores - block_max)  # padding: exactly 0
    block_sum = exps.sum(dim=-1, keepdim=True)  # [R, Hkv, nb, G, 1]
    block_out = torch.matmul(exps, v_blocks)  # [R, Hkv, nb, G, D]
    has_keys = mask.any(dim=-1, keepdim=True)  # [R, 1, nb, 1, 1]
    top = torch.where(has_keys, block_max, torch.full_like(block_max, float("-inf")))
    top = top.amax(dim=2, keepdim=True)  # [R, Hkv, 1, G, 1]
    weight = torch.where(has_keys, torch.exp(block_max - top), torch.zeros_like(block_max))
    # Running sums over blocks, left to right: the last entry is the total (≥ 1 for a row
    # with keys: its top block's weight is 1).
    total = torch.cumsum(weight * block_sum, dim=2)[:, :, -1].clamp_min(1.0)  # [R, Hkv, G, 1]
    out = torch.cumsum(weight * block_out, dim=2)[:, :, -1] / total  # [R, Hkv, G, D]
    return out.reshape(num_rows, num_heads, head_dim)


class InvariantAttention:
    """The model's attention callback in batch-invariant mode (see the module docstring)."""

    def __init__(self, store: KVStore, plan: AttentionPlan, *, scale: float) -> None:
        device = store.keys.device
        slots, valid = context_slots(plan)
        self.store = store
        self.num_rows = plan.num_rows
        self.scale = scale
        self.write_slots = torch.tensor(plan.write_slots, dtype=torch.int64, device=device)
        self.positions = torch.tensor(plan.positions, dtype=torch.int64, device=device)
        self.slots = torch.from_numpy(slots).to(device)
        self.valid = torch.from_numpy(valid).to(device)

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q: [T', H, D], k, v: [T', Hkv, D]: the model's rows, padded as `context_slots` pads.
        assert q.shape[0] == self.slots.shape[0], (q.shape, self.slots.shape)
        self.store.write(layer, self.write_slots, k[: self.num_rows], v[: self.num_rows])
        keys, values = self.store.keys[layer], self.store.values[layer]
        shape = (*self.slots.shape, *keys.shape[1:])  # [T', L, Hkv, D]
        flat = self.slots.flatten()
        out = blocked_attention(
            q,
            keys.index_select(0, flat).view(shape),
            values.index_select(0, flat).view(shape),
            self.valid,
            scale=self.scale,
        )
        return out.to(q.dtype)
