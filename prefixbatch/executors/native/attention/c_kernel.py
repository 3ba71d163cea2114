"""The C span kernel's backend: a step's plan as the kernel's task list (`KernelPlan`).

One call per layer (`span_kernel.SpanKernel.__call__`) runs every span of the step on the
library's thread pool, reading keys and values in place in the store, each row's spans
merged inside the call by the same log-sum-exp merge as `spans.merge_entries`. This module
builds the task list, columnar (numpy over all the step's rows at once), once per step.

in → out: `AttentionPlan` → `KernelPlan` (the kernel's int64 tables).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from prefixbatch.executors.native.attention.plan import AttentionPlan, KeySpan

__all__ = ["KernelPlan"]

QUERIES_PER_TASK = 64
# A range is split into pieces of at least this many keys when there are too few tasks to
# keep every thread busy (one long sequence decoding).
MIN_SPLIT_KEYS = 256


@dataclass(frozen=True)
class KernelPlan:
    """An `AttentionPlan` as the span kernel's task list, built once per step for all layers.

    A task is a block of a span's rows against (a piece of) the span's key range; an entry is
    one row of one block, with the number of the range's keys it sees. A block of many rows
    (a prefill chunk's, say) runs as one task with the blocks of the same rows in its other
    spans chained to it: one online softmax over all their ranges. The entries of a row's
    tasks are merged by log-sum-exp inside the kernel call.
    """

    # [N + C, 6] int64: key_start, num_keys, first entry, num_rows, kv head (-1: all), the row
    # of the range chained next (-1: none); the first N are the tasks, the rest chained ranges
    tasks: torch.Tensor
    num_tasks: int
    entry_row: torch.Tensor  # [E] int64
    entry_visible: torch.Tensor  # [E] int64: keys of the block's range the entry's row sees
    row_ptr: torch.Tensor  # [T + 1] int64: row r's entries are row_entries[row_ptr[r]:row_ptr[r+1]]
    row_entries: torch.Tensor  # [E'] int64: the entries of tasks (not of chained ranges)

    @classmethod
    def of(
        cls,
        plan: AttentionPlan,
        *,
        group: int,
        num_kv_heads: int,
        num_threads: int,
        dot_max_queries: int,
        rows: np.ndarray | None = None,
    ) -> KernelPlan:
        """dot_max_queries: the kernel's (`SpanKernel.dot_max_queries`); a block of that many
        queries a kv head or fewer (a decode row) reads whole key slots for all its kv heads, so
        it is split by keys, never by head. rows (ascending, distinct): only these rows' outputs,
        as rows 0..len(rows)-1 of the call (T = len(rows)); None: all of the plan's.

        Columnar (numpy over all of the step's rows at once): a decode step has a span or more
        per sequence, hundreds of them."""
        num_rows = plan.num_rows
        kept = None
        if rows is not None:
            kept = np.full(num_rows, -1, dtype=np.int64)
            kept[rows] = np.arange(len(rows))
            num_rows = len(rows)
        dot_rows = dot_max_queries // group  # blocks of at most this many rows: all heads at once
        blocks = _Blocks.of(
            plan.spans, num_rows=plan.num_rows, rows_per_task=max(1, QUERIES_PER_TASK // group), dot_rows=dot_rows, kept=kept
        )
        pieces = blocks.split_keys(min_tasks=2 * num_threads, num_kv_heads=num_kv_heads, dot_rows=dot_rows)
        # Pieces of a range split for the threads' sake are the same rows too, but must not chain.
        chain = pieces is blocks
        blocks = pieces
        tasks, num_tasks, output = blocks.tasks(
            num_kv_heads=num_kv_heads, num_threads=num_threads, dot_rows=dot_rows, chain=chain
        )
        entry_row, entry_visible = blocks.rows, blocks.visible
        outputs = np.flatnonzero(output)  # entries of tasks: the rows' outputs come from these
        row_entries = outputs[np.argsort(entry_row[outputs], kind="stable")]
        row_ptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(entry_row[outputs], minlength=num_rows), out=row_ptr[1:])
        return cls(
            _int64(tasks), num_tasks, _int64(entry_row), _int64(entry_visible), _int64(row_ptr), _int64(row_entries)
        )


@dataclass(frozen=True)
class _Blocks:
    """A step's blocks, columns side by side: block b is rows[first[b] : first[b] + count[b]]
    (ascending, one span's) against keys [key_start[b], key_start[b] + num_keys[b]), row i of
    them seeing the range's first visible[first[b] + i] keys. Entries are the flat rows."""

    key_start: np.ndarray  # [B]
    num_keys: np.ndarray  # [B]: keys the block's rows see at most
    first: np.ndarray  # [B]
    count: np.ndarray  # [B]
    rows: np.ndarray  # [E]
    visible: np.ndarray  # [E]

    @classmethod
    def of(
        cls, spans: tuple[KeySpan, ...], *, num_rows: int, rows_per_task: int, dot_rows: int, kept: np.ndarray | None
    ) -> _Blocks:
        """Each span's rows in blocks of at most rows_per_task, in the plan's order; kept (row →
        its number in the call, -1: not wanted): only those rows, renumbered.

        The rows of a run of at least half a block and more than dot_rows rows (a prefill
        chunk: its causal span's rows) make blocks of their own, cut from the run's first row,
        in every span they are in: a chunk's block is then the same rows in each of its spans,
        and they chain (`tasks`). The other rows (decode rows, short chunks) fill blocks
        together: a prefix they share is read once for many of them."""
        sizes = np.fromiter((len(span.rows) for span in spans), np.int64, len(spans))
        rows = np.fromiter(itertools.chain.from_iterable(span.rows for span in spans), np.int64, int(sizes.sum()))
        span_keys = np.fromiter((span.num_keys for span in spans), np.int64, len(spans))
        causal = np.fromiter((-1 if span.causal_offset is None else span.causal_offset for span in spans), np.int64, len(spans))
        of_row, within = _parts(sizes)  # each entry's span, and its place among the span's rows
        keys = span_keys[of_row]
        visible = np.where(causal[of_row] < 0, keys, np.minimum(keys, causal[of_row] + 1 + within))
        run = np.full(num_rows, -1)  # a row's run's first row, for the runs that make own blocks
        in_run = ((causal >= 0) & (sizes > dot_rows) & (2 * sizes >= rows_per_task))[of_row]
        run[rows[in_run]] = rows[in_run] - within[in_run]
        run = run[rows]
        if kept is not None:
            wanted = kept[rows] >= 0
            of_row, rows, visible, run = of_row[wanted], kept[rows[wanted]], visible[wanted], run[wanted]
        # A block starts a span's (part of a) run, or rows_per_task rows into one.
        place = np.arange(len(rows))
        new_part = np.ones(len(rows), dtype=bool)
        new_part[1:] = (of_row[1:] != of_row[:-1]) | (run[1:] != run[:-1])
        first = np.flatnonzero((place - np.maximum.accumulate(np.where(new_part, place, 0))) % rows_per_task == 0)
        count = np.diff(np.append(first, len(rows)))
        num_keys = np.maximum.reduceat(visible, first)
        key_start = np.fromiter((span.key_start for span in spans), np.int64, len(spans))[of_row[first]]
        return cls(key_start, num_keys, first, count, rows, visible)

    def split_keys(self, *, min_tasks: int, num_kv_heads: int, dot_rows: int) -> _Blocks:
        """Blocks split into key pieces (≥ MIN_SPLIT_KEYS) until there are about `min_tasks`
        tasks (a block of more than `dot_rows` rows also splits by head: `tasks`): one long
        sequence decoding, say. A piece's entries are its block's rows, seeing the piece's keys."""
        units = int(np.where(self.count <= dot_rows, 1, num_kv_heads).sum())
        if units >= min_tasks or units == 0:
            return self
        pieces = np.clip(self.num_keys // MIN_SPLIT_KEYS, 1, math.ceil(min_tasks / units))
        size = np.maximum(1, -(-self.num_keys // pieces))
        of_piece, piece = _parts(np.maximum(1, -(-self.num_keys // size)))  # ranges of `size` keys
        start = piece * size[of_piece]
        num_keys = np.minimum(self.num_keys[of_piece], start + size[of_piece]) - start
        count = self.count[of_piece]
        of_entry, within = _parts(count)
        source = self.first[of_piece][of_entry] + within
        visible = np.minimum(np.maximum(self.visible[source] - start[of_entry], 0), num_keys[of_entry])
        first = np.cumsum(count) - count
        return _Blocks(self.key_start[of_piece] + start, num_keys, first, count, self.rows[source], visible)

    def tasks(
        self, *, num_kv_heads: int, num_threads: int, dot_rows: int, chain: bool
    ) -> tuple[np.ndarray, int, np.ndarray]:
        """The kernel's task rows [N + C, 6], N, and which entries are tasks' (not chained).

        With chain, blocks of more than `dot_rows` rows, consecutive, with the same rows (a
        prefill chunk's block in each of its spans) chain: the first in the plan's order is
        the task, the others follow it as ranges (no merge, the queries loaded once). Tasks
        come largest first (threads take them in turn: the big ones do not come last). A task
        is one item for all kv heads — it reads each key's slot whole — unless it is a large
        share of the call's work and has more than `dot_rows` rows: then one item per kv head,
        so threads share it."""
        num_blocks = len(self.count)
        start = self.rows[self.first]
        lanes = self.count > dot_rows
        chains = lanes & (self.rows[self.first + self.count - 1] - start == self.count - 1) & chain
        # Blocks with the same rows side by side (plan order within), every other block alone.
        same = np.where(chains, start * (int(self.count.max(initial=0)) + 1) + self.count, -1 - np.arange(num_blocks))
        order = np.argsort(same, kind="stable")
        leads = np.ones(num_blocks, dtype=bool)
        leads[1:] = same[order][1:] != same[order][:-1]
        is_task = np.empty(num_blocks, dtype=bool)
        is_task[order] = leads
        following = np.full(num_blocks, -1)  # the block chained after each
        following[order[:-1]] = np.where(leads[1:], -1, order[1:])
        task_of = np.empty(num_blocks, dtype=np.int64)
        task_of[order] = order[np.maximum.accumulate(np.where(leads, np.arange(num_blocks), 0))]

        work = self.count * self.num_keys
        work = np.bincount(task_of, weights=work, minlength=num_blocks).astype(np.int64)[is_task]  # a chain's
        tasks = np.flatnonzero(is_task)
        few = len(tasks) < 8 * num_threads  # too few tasks to keep the threads busy whole
        by_head = ((work > work.sum() / (4 * num_threads)) | few) & lanes[tasks]
        of_item, head = _parts(np.where(by_head, num_kv_heads, 1))
        head = np.where(by_head[of_item], head, -1)
        cost = np.where(by_head, work, work * num_kv_heads)[of_item]
        by_cost = np.argsort(-cost, kind="stable")
        items, head = tasks[of_item][by_cost], head[by_cost]
        chained = np.flatnonzero(~is_task)
        row_of = np.full(num_blocks, -1)  # a chained block's row in the table
        row_of[chained] = len(items) + np.arange(len(chained))
        blocks = np.concatenate([items, chained])
        nxt = following[blocks]
        columns = (
            self.key_start[blocks], self.num_keys[blocks], self.first[blocks], self.count[blocks],
            np.concatenate([head, np.full(len(chained), -1)]), np.where(nxt < 0, -1, row_of[nxt]),
        )  # fmt: skip
        return np.stack(columns, axis=1).reshape(-1, 6), len(items), np.repeat(is_task, self.count)


def _int64(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


def _parts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For counts [n] → (owner, index) [Σ counts]: part j of item i is (i, j), items in order."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(len(owner)) - (np.cumsum(counts) - counts)[owner]
