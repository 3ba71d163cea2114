"""The CUDA backend: PyTorch's FlashAttention-2 variable-length kernel, keys read in place.

FA2's varlen call attends sequence b's queries `q[cu_q[b] : cu_q[b+1]]` to its keys
`k[cu_k[b] : cu_k[b+1]]`, and returns each query's log-sum-exp beside its output. A step's
spans become such sequences without copying a key: the keys passed are the layer's store
itself, and the spans, sorted by slot, are sequences whose key ranges are their slot ranges;
the slots between two spans' ranges (other segments' keys, free slots) are sequences of their
own with no query, which the kernel skips. Two calls a layer: the ancestor spans (every row
sees every key) and the causal spans (a run's rows against its own segment, row i seeing the
range's keys up to num_keys − rows + i: FA2's causal mask, aligned bottom-right); spans whose ranges overlap (a segment prefilled beside a child that
took it into its own span) go to another call of the same kind. GQA is
native (H a multiple of Hkv). Each call's parts are the contract's entries (`spans`), merged
by `spans.merge_entries`. Memory: FA2 never forms the scores; the only copies are q's rows
in span order and the outputs, O(entries × H × D).

FA2 takes fp16 and bf16, head sizes up to 256 (a multiple of 8); the selection table
(`backends`) sends other shapes to Triton. The packing (`VarlenCall`) is plain tensor work,
tested on the CPU against the reference through `emulate` (the kernel's semantics in
PyTorch); the kernel itself runs only on a GPU (`benchmarks/gpu_check.py` holds it to the
reference there).

in → out: q [T, H, D], one layer's keys/values [capacity, Hkv, D], `SpanBatch` →
(part_out [E, H, D], part_lse [E, H]) fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixbatch.executors.native.attention.parts import attend_matmul
from prefixbatch.executors.native.attention.spans import SpanBatch

__all__ = ["VarlenCall", "attend_spans", "available", "emulate", "takes"]

_flash = getattr(torch.ops.aten, "_flash_attention_forward", None)


def available() -> bool:
    """Whether this PyTorch has the varlen flash kernel and a CUDA device to run it."""
    return _flash is not None and torch.cuda.is_available()


def takes(dtype: torch.dtype, head_dim: int) -> bool:
    """Shapes FA2 takes: fp16/bf16, head size a multiple of 8 up to 256."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


@dataclass(frozen=True)
class VarlenCall:
    """One varlen call over a step's spans of one kind (causal or not), sorted by slot.

    Sequence b's queries are `q_rows[cu_q[b] : cu_q[b+1]]` (rows of the step), its keys the
    store's slots `cu_k[b] : cu_k[b+1]`; gaps between spans are sequences without queries.
    `entries[i]` is the contract's entry of packed query i."""

    causal: bool
    num_keys: int  # the store's slots up to the last sequence's last key (the keys passed)
    q_rows: torch.Tensor  # [Q] int64: the step's rows, packed in sequence order
    entries: torch.Tensor  # [Q] int64: each packed query's entry in the SpanBatch
    cu_q: torch.Tensor  # [B + 1] int32
    cu_k: torch.Tensor  # [B + 1] int32
    max_q: int
    max_k: int

    @classmethod
    def of(cls, batch: SpanBatch, *, causal: bool) -> list[VarlenCall]:
        """The calls for the batch's causal (or non-causal) spans: one, unless key ranges
        overlap (a segment prefilled in the step beside a child whose span took it in:
        `plan`), then as many as it takes for each call's ranges to be disjoint."""
        chosen = sorted(
            (span.key_start, s) for s, span in enumerate(batch.spans) if (span.causal_offset is not None) == causal
        )
        calls: list[list[int]] = []  # span indices per call, by slot
        ends: list[int] = []  # each call's last key so far
        for key_start, s in chosen:
            call = next((c for c, end in enumerate(ends) if end <= key_start), None)
            if call is None:
                calls.append([])
                ends.append(0)
                call = len(calls) - 1
            calls[call].append(s)
            ends[call] = key_start + batch.spans[s].num_keys
        return [cls._packed(batch, spans, causal) for spans in calls]

    @classmethod
    def all_of(cls, batch: SpanBatch) -> list[VarlenCall]:
        """Every call of the batch, non-causal first: made at a step's first layer, from host
        data only (no device read), and kept for its other layers."""
        if "flash" not in batch.prepared:
            batch.prepared["flash"] = cls.of(batch, causal=False) + cls.of(batch, causal=True)
        return batch.prepared["flash"]

    @classmethod
    def _packed(cls, batch: SpanBatch, spans: list[int], causal: bool) -> VarlenCall:
        first = batch.span_first_host
        q_counts, k_bounds, entries = [], [0], []
        for s in spans:
            span = batch.spans[s]
            if span.key_start > k_bounds[-1]:  # the slots between: a sequence with no query
                q_counts.append(0)
                k_bounds.append(span.key_start)
            q_counts.append(len(span.rows))
            k_bounds.append(span.key_start + span.num_keys)
            entries.extend(range(first[s], first[s + 1]))
        device = batch.entry_rows.device
        entries_t = torch.tensor(entries, dtype=torch.int64, device=device)
        cu_q = [0]
        for count in q_counts:
            cu_q.append(cu_q[-1] + count)
        return cls(
            causal=causal,
            num_keys=k_bounds[-1],
            q_rows=batch.entry_rows[entries_t],
            entries=entries_t,
            cu_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
            cu_k=torch.tensor(k_bounds, dtype=torch.int32, device=device),
            max_q=max(q_counts),
            max_k=max(b - a for a, b in zip(k_bounds, k_bounds[1:])),
        )


def attend_spans(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: SpanBatch, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every entry of the batch against its span's keys, by FA2 (CUDA) → parts, fp32."""
    return _run(q, keys, values, batch, scale=scale, kernel=_flash_call)


def emulate(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: SpanBatch, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_spans` with FA2's varlen semantics computed by PyTorch (any device, any
    dtype): the same packing and sequence boundaries, each sequence attended on its own with
    the bottom-right causal mask. Tests hold the packing to the reference with it."""
    return _run(q, keys, values, batch, scale=scale, kernel=_emulated_call)


def _run(q, keys, values, batch: SpanBatch, *, scale: float, kernel):
    num_heads, head_dim = q.shape[1:]
    part_out = torch.zeros((batch.num_entries, num_heads, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.full((batch.num_entries, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for call in VarlenCall.all_of(batch):
        end = call.num_keys  # the store up to the last span's last key, in place
        out, lse = kernel(q[call.q_rows], keys[:end], values[:end], call, scale)  # [Q, H, D], [Q, H]
        part_out[call.entries] = out.float()
        part_lse[call.entries] = lse
    return part_out, part_lse


def _flash_call(q, keys, values, call: VarlenCall, scale: float):
    out, lse, *_ = _flash(
        q, keys, values, call.cu_q, call.cu_k, call.max_q, call.max_k, 0.0, call.causal, False, scale=scale
    )
    return out, _packed_lse(lse, call, q.shape[0])


def _packed_lse(lse: torch.Tensor, call: VarlenCall, num_queries: int) -> torch.Tensor:
    """FA2's varlen log-sum-exp as [Q, H] fp32: it comes unpadded [H, Q] (current FA2), or
    padded per sequence [B, H, max_q] (older builds)."""
    if lse.dim() == 2:
        assert lse.shape[1] == num_queries, (lse.shape, num_queries)
        return lse.t().float()
    sequence = torch.repeat_interleave(
        torch.arange(call.cu_q.shape[0] - 1, device=lse.device), (call.cu_q[1:] - call.cu_q[:-1]).long(),
        output_size=num_queries,  # known: no device read to size the result
    )
    within = torch.arange(num_queries, device=lse.device) - call.cu_q[sequence].long()
    return lse[sequence, :, within].float()


def _emulated_call(q, keys, values, call: VarlenCall, scale: float):
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    cu_q, cu_k = call.cu_q.tolist(), call.cu_k.tolist()
    for b in range(len(cu_q) - 1):
        queries = slice(cu_q[b], cu_q[b + 1])
        num_q, num_k = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        if num_q == 0:
            continue
        offset = num_k - num_q if call.causal else None  # bottom-right: the last query sees every key
        part_out, part_lse = attend_matmul(
            q[queries].float(), keys[cu_k[b] : cu_k[b + 1]].float(), values[cu_k[b] : cu_k[b + 1]].float(),
            scale=scale, causal_offset=offset,
        )  # fmt: skip
        out[queries], lse[queries] = part_out, part_lse
    return out, lse
