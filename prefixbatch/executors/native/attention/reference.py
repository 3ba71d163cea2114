"""The reference backend: the span contract in plain PyTorch, fp32, any device — the oracle.

Every span's entries against its keys, in blocks of at most `ROW_BLOCK` rows × `KEY_BLOCK`
keys: each block one masked fp32 product (`parts.attend_matmul` on fp32 copies), a row
block's key blocks merged by log-sum-exp as they come. No temporary grows with rows × keys:
the largest is one block's scores, H × ROW_BLOCK × KEY_BLOCK fp32 (32 heads: 8 MiB), and a
long prefill chunk of 16,384 rows needs no more than a decode row (`memory_bound_bytes`).
Key blocks a row block cannot see (past its last row's causal limit) are skipped.

Slow (a Python loop over spans and blocks) and simple on purpose: the other backends are
held to it in tests, on the CPU in CI and on a GPU by `benchmarks/gpu_check.py`.

in → out: q [T, H, D], one layer's keys/values [capacity, Hkv, D], `SpanBatch` →
(part_out [E, H, D], part_lse [E, H]) fp32.
"""

from __future__ import annotations

import torch

from prefixbatch.executors.native.attention.parts import attend_matmul, merge
from prefixbatch.executors.native.attention.spans import SpanBatch

__all__ = ["KEY_BLOCK", "ROW_BLOCK", "attend_spans", "memory_bound_bytes"]

ROW_BLOCK = 128
KEY_BLOCK = 512


def memory_bound_bytes(num_heads: int, head_dim: int) -> int:
    """The most bytes of temporaries one block takes, whatever the step's rows and keys: its
    fp32 scores and probabilities (H × rows × keys each, plus a masked copy), and its q, k,
    v and output copies."""
    scores = num_heads * ROW_BLOCK * KEY_BLOCK * 4
    operands = (2 * ROW_BLOCK + 2 * KEY_BLOCK) * num_heads * head_dim * 4
    return 4 * scores + 2 * operands


def attend_spans(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: SpanBatch, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every entry of the batch against its span's keys → (part_out [E, H, D], part_lse [E, H]) fp32."""
    num_heads, head_dim = q.shape[1:]
    part_out = torch.zeros((batch.num_entries, num_heads, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.full((batch.num_entries, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    first = 0
    for span in batch.spans:
        rows = batch.entry_rows[first : first + len(span.rows)]
        for start in range(0, len(span.rows), ROW_BLOCK):
            stop = min(start + ROW_BLOCK, len(span.rows))
            out, lse = _row_block(q[rows[start:stop]].float(), keys, values, span, start, stop, scale)
            part_out[first + start : first + stop], part_lse[first + start : first + stop] = out, lse
        first += len(span.rows)
    return part_out, part_lse


def _row_block(q, keys, values, span, start: int, stop: int, scale: float):
    """Rows start..stop-1 of a span (q [n, H, D] fp32) against the keys they see, key block by key block."""
    visible = span.num_keys if span.causal_offset is None else min(span.num_keys, span.causal_offset + stop)
    result = None
    for key in range(0, visible, KEY_BLOCK):
        end = min(key + KEY_BLOCK, visible)
        # Row i of the block (the span's row start + i) sees the span's keys ≤ causal_offset + start + i.
        offset = None if span.causal_offset is None else span.causal_offset + start - key
        part = attend_matmul(
            q,
            keys[span.key_start + key : span.key_start + end].float(),
            values[span.key_start + key : span.key_start + end].float(),
            scale=scale,
            causal_offset=offset,
        )
        result = part if result is None else merge([result, part])
    if result is None:  # sees no key (cannot happen for a plan's span, kept exact anyway)
        return torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), device=q.device)
    return result
