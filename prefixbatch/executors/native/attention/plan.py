"""Which queries of a step attend to which KV: a plain-data plan, built once per step.

A step computes one flat batch of T tokens ("rows"): chunks of segments being prefilled
and decode tokens, from any number of sequences. Sequences form a tree of segments (a
shared prompt prefix is a node; a sequence's own suffix + output is a leaf), each segment's
KV in one contiguous slot range of the store (`kv.KVStore`). A row's context is every
ancestor segment of its segment, whole, then its own segment up to and including itself.

The plan splits that into `KeySpan`s, each "these rows against these contiguous slots":
- one span per ancestor node with rows under it: the rows of *all* runs below the node,
  stacked, against the node's whole KV, unmasked. This is the shared-prefix product
  (Hydragen / cascade attention): one matrix-matrix product instead of one per sequence;
- one span per run: the run's rows against its own segment's first `offset + n` keys,
  causal (row i sees keys ≤ offset + i). Ancestors that only this run's rows attend to in
  this step and that lie right before its segment in the store (a prompt nobody else shares,
  allocated just before its sequence's own segment) join this span: one product, no merge.
Every row appears in exactly one causal span and in one span per ancestor; the executor
(`tree_attention`) merges a row's spans exactly by log-sum-exp. Depth is unbounded.

Contract with the engine (asserted where cheap):
- A run's tokens occupy consecutive rows and consecutive offsets of its segment; runs
  cover the rows 0..T-1 exactly once; no two rows write the same slot.
- `SegmentKV.num_keys` counts the tokens whose KV is in the store *after this step's writes*.
  The executor writes a layer's k, v for every row before attending, so a row may attend
  to keys written in the same step: a child's first chunk may ride with its parent's last.
- An ancestor is complete (all its tokens stored) before any descendant attends to it.

The plan is plain Python (no torch): the scheduler can build and test it on its own.

in → out: segments (tree + slots) and this step's runs → `AttentionPlan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AttentionPlan", "KeySpan", "QueryRun", "SegmentKV", "plan_attention"]


@dataclass(frozen=True)
class SegmentKV:
    """A tree segment and where its KV lives in the store."""

    segment_id: int
    parent_id: int | None  # None: a root (the first segment of its sequences)
    key_start: int  # slot of the segment's first token, in every layer
    num_keys: int  # tokens of the segment stored once this step's tokens are written


@dataclass(frozen=True)
class QueryRun:
    """Consecutive tokens of one segment computed this step, at consecutive rows of the batch."""

    segment_id: int
    first_row: int  # row of the run's first token in the flat batch
    offset: int  # the first token's offset within its segment (0 for a fresh segment)
    num_tokens: int  # a prefill chunk's length, or 1 for a decode token


@dataclass(frozen=True)
class KeySpan:
    """One part of the attention: some rows against one contiguous range of slots."""

    rows: tuple[int, ...]  # rows of the batch, ascending
    key_start: int  # first slot of the keys
    num_keys: int
    # None: every row sees every key (an ancestor). Else rows[i] sees keys ≤ causal_offset + i
    # (the rows' own segment, of which they are consecutive tokens).
    causal_offset: int | None


@dataclass(frozen=True)
class AttentionPlan:
    """Everything attention needs for one step, shared by all layers."""

    num_rows: int
    spans: tuple[KeySpan, ...]  # ancestor spans first, then causal spans
    write_slots: tuple[int, ...]  # row → slot where the row's k, v are stored
    positions: tuple[int, ...]  # row → absolute position in its sequence (rope's input)


def plan_attention(segments: Sequence[SegmentKV], runs: Sequence[QueryRun]) -> AttentionPlan:
    """The spans, write slots and positions of a step's runs over the segment tree."""
    by_id = {segment.segment_id: segment for segment in segments}
    num_rows = sum(run.num_tokens for run in runs)
    write_slots = [-1] * num_rows
    positions = [-1] * num_rows
    rows_under: dict[int, list[int]] = {}  # ancestor id → rows below it, insertion-ordered
    chains = []
    for run in runs:
        segment = _checked_segment(run, by_id, num_rows)
        ancestors = _ancestors(segment, by_id)
        rows = tuple(range(run.first_row, run.first_row + run.num_tokens))
        first_position = sum(a.num_keys for a in ancestors) + run.offset
        for i, row in enumerate(rows):
            _check_unset(write_slots, row)
            write_slots[row] = segment.key_start + run.offset + i
            positions[row] = first_position + i
        for ancestor in ancestors:
            rows_under.setdefault(ancestor.segment_id, []).extend(rows)
        chains.append((run, segment, ancestors, rows))
    if len(set(write_slots)) != num_rows:
        raise ValueError("two rows of the step write the same slot: runs overlap")
    causal_spans, absorbed = [], set()
    for run, segment, ancestors, rows in chains:
        # Ancestors only this run attends to this step, stored right before the keys that
        # follow them, join its causal span: one product over one range, no merge.
        key_start, before = segment.key_start, 0
        for ancestor in reversed(ancestors):
            private = len(rows_under[ancestor.segment_id]) == len(rows)
            if not (private and ancestor.key_start + ancestor.num_keys == key_start):
                break
            absorbed.add(ancestor.segment_id)
            key_start, before = ancestor.key_start, before + ancestor.num_keys
        causal_spans.append(
            KeySpan(rows, key_start, before + run.offset + run.num_tokens, before + run.offset)
        )
    ancestor_spans = [
        KeySpan(tuple(sorted(rows)), by_id[sid].key_start, by_id[sid].num_keys, None)
        for sid, rows in rows_under.items()
        if by_id[sid].num_keys > 0 and sid not in absorbed
    ]
    return AttentionPlan(
        num_rows, tuple(ancestor_spans + causal_spans), tuple(write_slots), tuple(positions)
    )


def _checked_segment(run: QueryRun, by_id: dict[int, SegmentKV], num_rows: int) -> SegmentKV:
    segment = by_id.get(run.segment_id)
    if segment is None:
        raise ValueError(
            f"run {run} names segment {run.segment_id}, which is not among the segments"
        )
    if run.num_tokens < 1 or run.offset < 0 or run.offset + run.num_tokens > segment.num_keys:
        raise ValueError(
            f"run {run} must lie within the {segment.num_keys} stored tokens of its segment"
        )
    if run.first_row < 0 or run.first_row + run.num_tokens > num_rows:
        raise ValueError(f"run {run} must lie within the step's {num_rows} rows")
    return segment


def _check_unset(write_slots: list[int], row: int) -> None:
    if write_slots[row] != -1:
        raise ValueError(f"row {row} belongs to two runs; runs must cover each row once")


def _ancestors(segment: SegmentKV, by_id: dict[int, SegmentKV]) -> list[SegmentKV]:
    """The segment's ancestors, root first (iterative; a cycle is an error, not a hang)."""
    chain = []
    parent_id = segment.parent_id
    while parent_id is not None:
        parent = by_id.get(parent_id)
        if parent is None:
            raise ValueError(
                f"segment {segment.segment_id} has ancestor {parent_id}, which is not among the segments"
            )
        chain.append(parent)
        if len(chain) > len(by_id):
            raise ValueError(f"segment {segment.segment_id}'s ancestors form a cycle")
        parent_id = parent.parent_id
    return chain[::-1]
