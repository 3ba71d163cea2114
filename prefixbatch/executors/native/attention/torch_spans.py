"""The PyTorch backend: a step's spans with PyTorch's kernels, merged span by span.

For each span of the plan, its rows' queries attend to its slot range with `parts.attend`
(PyTorch's fused CPU flash kernel where it runs, else batched `bmm` and an fp32 softmax: one
batched product however many sequences share the span), and the result is merged into
running per-row accumulators (out and lse in fp32) with the exact log-sum-exp merge. Narrow
spans (a decode row's own few keys) go to one padded gather instead (`Gathered`). Merging span
by span, in the plan's fixed order, writes each row with plain indexing (no atomic adds), so
the result is deterministic run to run.

The CPU's path where the C span kernel does not apply (no compiler, fp16, head sizes it does
not take), and the tests' second opinion on it.

in → out: q [T, H, D] + one layer's store + `DevicePlan` → out [T, H, D] fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from prefixbatch.executors.native.attention.parts import (
    attend,
    attend_fused,
    attend_gathered,
    attend_matmul,
    merge,
)
from prefixbatch.executors.native.attention.plan import AttentionPlan, KeySpan

__all__ = ["DevicePlan", "DeviceSpan", "Gathered", "tree_attention"]

Rows = slice | torch.Tensor


@dataclass(frozen=True)
class DeviceSpan:
    rows: Rows  # a slice when the rows are consecutive: a view, no gather
    key_start: int
    key_stop: int
    causal_offset: int | None
    first: bool  # no earlier span of the step has any of these rows: store, don't merge


# A span whose rows would copy at most this many keys in all (rows × visible keys) is not
# worth a kernel call of its own: its rows fetch the keys in the step's one batched gather.
# Copying a key costs far less than a call and a merge, but a call reads its keys once for
# all its rows (a prefix many sequences share: the shared-prefix product), and copying
# hundreds of keys per row costs more than the call.
GATHER_MAX_KEYS = 256


def _visible_keys(span: KeySpan) -> int:
    """Keys the span's last row sees."""
    if span.causal_offset is None:
        return span.num_keys
    return min(span.num_keys, span.causal_offset + len(span.rows))


def _is_gathered(span: KeySpan) -> bool:
    # A causal span of several rows is a prefill chunk: its rows see different key counts.
    if span.causal_offset is not None and len(span.rows) > 1:
        return False
    return len(span.rows) * _visible_keys(span) <= GATHER_MAX_KEYS


@dataclass(frozen=True)
class Gathered:
    """Narrow spans, batched: each of their rows against its own keys, gathered and padded.

    In a decode step most spans hold one or a few rows (a sequence's own tokens, the leaf
    node of a prompt nobody else shares, a prefix two or three sequences share); one padded
    gather replaces hundreds of tiny products.
    """

    rows: torch.Tensor  # [R] int64, distinct rows
    slots: torch.Tensor  # [R, L] int64, row r's visible key slots, padded
    valid: torch.Tensor  # [R, L] bool, False on padding

    @classmethod
    def of(cls, spans: list[KeySpan], device: torch.device | str) -> Gathered | None:
        keys_of: dict[int, list[range]] = {}
        for span in spans:
            visible = span.num_keys if span.causal_offset is None else min(span.num_keys, span.causal_offset + 1)
            for row in span.rows:
                keys_of.setdefault(row, []).append(range(span.key_start, span.key_start + visible))
        if not keys_of:
            return None
        rows = sorted(keys_of)
        slot_lists = [[slot for r in keys_of[row] for slot in r] for row in rows]
        width = max(max((len(s) for s in slot_lists), default=1), 1)
        slots = np.zeros((len(rows), width), np.int64)
        valid = np.zeros((len(rows), width), bool)
        for i, row_slots in enumerate(slot_lists):
            slots[i, : len(row_slots)] = row_slots
            valid[i, : len(row_slots)] = True
        return cls(
            torch.tensor(rows, dtype=torch.int64, device=device),
            torch.from_numpy(slots).to(device),
            torch.from_numpy(valid).to(device),
        )


@dataclass(frozen=True)
class DevicePlan:
    """An `AttentionPlan` with its index lists as tensors on the device, built once per step."""

    num_rows: int
    spans: tuple[DeviceSpan, ...]  # wide spans and prefill chunks
    write_slots: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    gathered: Gathered | None = None  # the narrow spans, batched

    @classmethod
    def of(cls, plan: AttentionPlan, device: torch.device | str, *, spans: bool = True) -> DevicePlan:
        """spans=False: only write slots and positions (the span kernel runs the spans)."""
        single = [span for span in plan.spans if _is_gathered(span)] if spans else []
        multi = [span for span in plan.spans if not _is_gathered(span)] if spans else []
        # One host→device copy for all index lists, then views: a step may have hundreds of spans.
        gathered = [span.rows for span in multi if not _is_consecutive(span.rows)]
        flat = [row for rows in gathered for row in rows]
        index = torch.tensor(
            list(plan.write_slots) + list(plan.positions) + flat, dtype=torch.int64
        )
        index = index.to(device)
        write_slots, positions, rest = index.split([plan.num_rows, plan.num_rows, len(flat)])
        rest_parts = iter(rest.split([len(rows) for rows in gathered]))
        seen: set[int] = set()
        spans = []
        for span in multi:
            spans.append(
                DeviceSpan(
                    rows=_as_slice(span.rows) if _is_consecutive(span.rows) else next(rest_parts),
                    key_start=span.key_start,
                    key_stop=span.key_start + span.num_keys,
                    causal_offset=span.causal_offset,
                    first=seen.isdisjoint(span.rows),
                )
            )
            seen.update(span.rows)
        return cls(plan.num_rows, tuple(spans), write_slots, positions, Gathered.of(single, device))


# Queries (rows × query heads per kv head) one kernel task serves: each key it loads is used
# this many times. Measured (512 rows against 1,024 keys, the `small` shapes, 2 threads): 32
# queries a task 4.0 ms, 64: 3.6 ms, 128: 3.8 ms (PyTorch's fused kernel: 6.6 ms).

def _is_consecutive(rows: tuple[int, ...]) -> bool:
    return bool(rows) and rows[-1] - rows[0] == len(rows) - 1


def _as_slice(rows: tuple[int, ...]) -> slice:
    return slice(rows[0], rows[-1] + 1)


def tree_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    plan: DevicePlan,
    *,
    scale: float,
    fused: bool | None = None,
) -> torch.Tensor:
    """q: [T, H, D], keys, values: [capacity, Hkv, D] (one layer's store) → out [T, H, D] fp32.

    fused: True/False forces `attend_fused` / `attend_matmul` (tests); None picks by device.
    """
    assert q.shape[0] == plan.num_rows, (q.shape, plan.num_rows)
    attend_span = attend if fused is None else attend_fused if fused else attend_matmul
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [T, H, D]
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)  # [T, H]
    for span in plan.spans:
        part_out, part_lse = attend_span(
            q[span.rows],
            keys[span.key_start : span.key_stop],
            values[span.key_start : span.key_stop],
            scale=scale,
            causal_offset=span.causal_offset,
        )
        if span.first:  # the accumulator holds nothing for these rows yet
            out[span.rows], lse[span.rows] = part_out.float(), part_lse
        else:
            _merge_into(out, lse, span.rows, part_out, part_lse)
    if plan.gathered is not None:
        g = plan.gathered
        # index_select over the flattened slots: several times faster than `keys[g.slots]`.
        shape = (*g.slots.shape, *keys.shape[1:])  # [R, L, Hkv, D]
        flat = g.slots.flatten()
        part = attend_gathered(
            q[g.rows],
            keys.index_select(0, flat).view(shape),
            values.index_select(0, flat).view(shape),
            g.valid,
            scale=scale,
            fused=fused,
        )
        _merge_into(out, lse, g.rows, *part)
    return out


def _merge_into(
    out: torch.Tensor, lse: torch.Tensor, rows: Rows, part_out: torch.Tensor, part_lse: torch.Tensor
) -> None:
    """`merge` of the accumulators' rows with one more part, written back: out, lse fp32."""
    if isinstance(rows, slice):  # views: update in place
        merged_out, merged_lse = merge([(out[rows], lse[rows]), (part_out, part_lse)])
        out[rows].copy_(merged_out)
        lse[rows].copy_(merged_lse)
    else:
        out[rows], lse[rows] = merge([(out[rows], lse[rows]), (part_out, part_lse)])
