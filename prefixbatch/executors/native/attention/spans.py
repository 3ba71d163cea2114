"""The attention contract every span backend meets: a step's spans in, a part per span-row out,
and the one exact merge of a row's parts.

A step's `AttentionPlan` says which rows attend to which contiguous slot ranges of the store
(`plan.KeySpan`). `SpanBatch` is that plan as flat tensors on the device, built once per step
for all layers. Its *entries* are the spans' rows, span after span in the plan's order (span
s holds entries `span_first[s] : span_first[s + 1]`); entry i of a causal span sees the span's
first `causal[s] + i + 1` keys, entry i of any other span all `num_keys[s]` of them. A
backend computes, for every entry, attention over its span's keys: `part_out [E, H, D]` and
`part_lse [E, H]` (fp32; an entry that sees no key: 0 and -inf). `merge_entries` then combines
each row's parts exactly:

    lse = log Σᵢ exp(lseᵢ)        out = Σᵢ exp(lseᵢ − lse) · outᵢ

in a fixed order (the plan's), by gathers and sums, never atomics: the result does not
depend on thread timing, on any device. The C span kernel merges inside its call by the same
formula; `parts.merge` is its two-part form.

in → out: `AttentionPlan` → `SpanBatch`; (part_out, part_lse, batch) → (out [T, H, D], lse [T, H]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from prefixbatch.executors.native.attention.plan import AttentionPlan, KeySpan

__all__ = ["SpanBatch", "merge_entries"]


@dataclass(frozen=True)
class SpanBatch:
    """A step's spans as device tensors (int64), shared by every layer of the step."""

    num_rows: int  # T: rows of the step
    spans: tuple[KeySpan, ...]  # the plan's, on the host (backends that loop over spans)
    entry_rows: torch.Tensor  # [E] the row of each entry: the spans' rows, span after span
    span_first: torch.Tensor  # [S + 1] span s's entries are span_first[s] : span_first[s + 1]
    key_start: torch.Tensor  # [S] first slot of span s's keys
    num_keys: torch.Tensor  # [S]
    causal: torch.Tensor  # [S] -1: every entry sees every key; else entry i sees causal + i + 1
    row_entries: torch.Tensor  # [T, P] each row's entries in the plan's order, -1 padding
    max_span_rows: int  # the most entries of one span
    max_span_keys: int  # the most keys of one span
    span_first_host: tuple[int, ...] = ()  # span_first, on the host: no device read to loop over spans
    # What a backend derives from the batch once for all the step's layers (its tile table,
    # its varlen sequences), by the backend's key: built at the first layer, freed with the batch.
    prepared: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_entries(self) -> int:
        return int(self.entry_rows.shape[0])

    @classmethod
    def of(cls, plan: AttentionPlan, device: torch.device | str) -> SpanBatch:
        spans = tuple(span for span in plan.spans if span.num_keys > 0 and span.rows)
        sizes = np.array([len(span.rows) for span in spans], dtype=np.int64)
        entry_rows = np.fromiter((row for span in spans for row in span.rows), np.int64, int(sizes.sum()))
        span_first = np.zeros(len(spans) + 1, dtype=np.int64)
        np.cumsum(sizes, out=span_first[1:])
        columns = np.array(
            [(span.key_start, span.num_keys, -1 if span.causal_offset is None else span.causal_offset) for span in spans],
            dtype=np.int64,
        ).reshape(-1, 3)
        row_entries = _row_entries(entry_rows, plan.num_rows)
        # One host→device copy of everything, then views.
        flat = torch.from_numpy(np.concatenate([entry_rows, span_first, columns.T.ravel(), row_entries.ravel()]))
        flat = flat.to(device)
        num_spans, num_entries = len(spans), len(entry_rows)
        parts = flat.split([num_entries, num_spans + 1, num_spans, num_spans, num_spans, row_entries.size])
        return cls(
            num_rows=plan.num_rows,
            spans=spans,
            entry_rows=parts[0],
            span_first=parts[1],
            key_start=parts[2],
            num_keys=parts[3],
            causal=parts[4],
            row_entries=parts[5].view(row_entries.shape),
            max_span_rows=int(sizes.max(initial=0)),
            max_span_keys=int(columns[:, 1].max(initial=0)),
            span_first_host=tuple(span_first.tolist()),
        )


def _row_entries(entry_rows: np.ndarray, num_rows: int) -> np.ndarray:
    """[T, P]: row r's entries, ascending (the plan's order), padded with -1."""
    order = np.argsort(entry_rows, kind="stable")  # entries by row, plan order within a row
    counts = np.bincount(entry_rows, minlength=num_rows)
    width = max(int(counts.max(initial=0)), 1)
    table = np.full((num_rows, width), -1, dtype=np.int64)
    place = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    table[entry_rows[order], place] = order
    return table


def merge_entries(
    part_out: torch.Tensor, part_lse: torch.Tensor, batch: SpanBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's parts merged exactly: part_out [E, H, D], part_lse [E, H] fp32 → out [T, H, D]
    fp32, lse [T, H] fp32. A row with no part, or only parts that saw no key: 0 and -inf."""
    if batch.num_entries == 0:
        out = torch.zeros((batch.num_rows, *part_out.shape[1:]), dtype=torch.float32, device=part_out.device)
        return out, torch.full(out.shape[:2], float("-inf"), device=out.device)
    index = batch.row_entries  # [T, P]
    missing = index < 0
    safe_index = index.clamp_min(0)
    lse = part_lse[safe_index].masked_fill(missing[..., None], float("-inf"))  # [T, P, H]
    total = torch.logsumexp(lse, dim=1)  # [T, H]; -inf where every part is
    safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = torch.exp(lse - safe_total[:, None])  # [T, P, H]: 0 for missing parts
    out = torch.zeros((batch.num_rows, *part_out.shape[1:]), dtype=torch.float32, device=part_out.device)
    for p in range(index.shape[1]):  # P is the tree's depth (a few): one fused pass each
        out.addcmul_(part_out[safe_index[:, p]].float(), weights[:, p, :, None])
    return out, total
