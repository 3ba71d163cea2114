"""Runs an `AttentionPlan` on tensors: shared-prefix (tree) attention for a whole flat batch.

Two ways to run a plan, same contract and results within fp32 rounding:
- on the CPU in fp32 or bf16 (a bf16 store, fp32 sums), our span kernel (`span_kernel`, C): the whole plan is one task list
  (`KernelPlan`), each layer one call, every span read in place from the store, rows of a
  span in blocks that share each key load, each row's spans merged inside the call;
- elsewhere (GPUs, other dtypes, no C compiler), PyTorch's kernels: for each span of the
  plan, its rows' queries attend to its slot range with `attend` (one batched product however
  many sequences share the span), and the result is merged into running per-row accumulators
  (out in fp32, lse in fp32) with the exact log-sum-exp merge. Merging span by span, in the
  plan's fixed order, writes each row with plain indexing (no atomic adds), so the result is
  deterministic run to run, on CUDA too.

`TreeAttention` is the model's attention callback (`model.AttentionFn`) over a `KVStore`:
per layer it writes the step's k, v to their slots, then runs the plan on that layer.

in → out: q [T, H, D] + the layer's store buffers + plan → out [T, H, D].
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from prefixbatch.executors.native.attention import (
    attend,
    attend_fused,
    attend_gathered,
    attend_matmul,
    merge,
)
from prefixbatch.executors.native.attention_plan import AttentionPlan, KeySpan
from prefixbatch.executors.native.kv import KVStore
from prefixbatch.executors.native.span_kernel import SpanKernel, load_span_kernel, takes

__all__ = ["DevicePlan", "DeviceSpan", "KernelPlan", "TreeAttention", "tree_attention"]

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


class TreeAttention:
    """The model's attention callback for one step: store k, v at the plan's slots, attend by plan.

    kernel: "auto" runs the span kernel where it applies (CPU, fp32 or bf16, a head size it takes, and
    a C compiler to build it) and PyTorch's kernels elsewhere; None always PyTorch's. fused
    True/False forces `attend_fused` / `attend_matmul` (tests).
    """

    def __init__(
        self,
        store: KVStore,
        plan: AttentionPlan | DevicePlan,
        *,
        scale: float,
        fused: bool | None = None,
        kernel: SpanKernel | Literal["auto"] | None = "auto",
    ) -> None:
        self.store = store
        self.scale = scale
        self.fused = fused
        if kernel == "auto":
            keys = store.keys
            kernel = load_span_kernel() if takes(keys.device, keys.dtype, keys.shape[-1]) else None
        self.kernel = kernel if fused is None and isinstance(plan, AttentionPlan) else None
        self.attention_plan = plan if isinstance(plan, AttentionPlan) else None
        if isinstance(plan, DevicePlan):
            self.plan = plan
        else:  # the span kernel needs no device spans; built below if it turns out not to apply
            self.plan = DevicePlan.of(plan, store.keys.device, spans=self.kernel is None)
        self.kernel_plan: KernelPlan | None = None

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q: [T, H, D], k, v: [T, Hkv, D] → out: [T, H, D] in q's dtype
        out = self._in_kernel(layer, q, k, v, angles=None)
        if out is not None:
            return out
        self.store.write(layer, self.plan.write_slots, k, v)
        keys, values = self.store.keys[layer], self.store.values[layer]
        out = tree_attention(q, keys, values, self.plan, scale=self.scale, fused=self.fused)
        return out.to(q.dtype)

    def attend_unroped(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """As a call, for q and k before rope (cos, sin [T, D/2] fp32: `rope_angles`): rope, the
        KV write and attention in the span kernel's one call. None where the kernel does not
        apply: the caller applies rope and calls this object instead. rows (ascending,
        distinct): every row's k, v stored, the outputs of these rows only [len(rows), H, D].
        bf16 q: None too, so that rope rounds as transformers' bf16 rope does (the model's)."""
        if cos.dtype != torch.float32 or sin.dtype != torch.float32 or q.dtype != torch.float32:
            return None
        return self._in_kernel(layer, q, k, v, angles=(cos.contiguous(), sin.contiguous()), rows=rows)

    def _in_kernel(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: tuple | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The span kernel's call (k, v stored in it), or None where it does not apply. bf16 q,
        k, v (a bf16 store) are computed with in fp32: exact copies, every sum fp32 (as
        PyTorch's CPU attention sums bf16 inputs), the output rounded back to bf16."""
        if self.kernel is None:
            return None
        if q.dtype == torch.bfloat16:
            out = self._in_kernel(layer, q.float(), k.float(), v.float(), angles, rows)
            return None if out is None else out.to(torch.bfloat16)
        keys, values = self.store.keys[layer], self.store.values[layer]
        if not self.kernel.supports(q, keys.shape[1]):  # shapes it does not take: PyTorch's from now on
            self.kernel = None
            self.plan = DevicePlan.of(self.attention_plan, keys.device)
            return None
        if not all(x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] for x in (k, v)):
            return None  # heads not laid out as the kernel reads them: stored by `write` instead
        query_angles = None
        if rows is not None:  # one layer a step (the last): its own plan, of these rows
            p = self._kernel_plan(q, keys, rows.numpy())
            q = q[rows]  # [R, H, D]
            query_angles = None if angles is None else (angles[0][rows], angles[1][rows])
        else:
            if self.kernel_plan is None:
                self.kernel_plan = self._kernel_plan(q, keys, None)
            p = self.kernel_plan
        out, _ = self.kernel(
            q, keys, values, p.tasks, p.entry_row, p.entry_visible, p.row_ptr, p.row_entries,
            scale=self.scale, new=(k, v, self.plan.write_slots), angles=angles, query_angles=query_angles,
            num_tasks=p.num_tasks,
        )  # fmt: skip
        return out

    def _kernel_plan(self, q: torch.Tensor, keys: torch.Tensor, rows: np.ndarray | None) -> KernelPlan:
        return KernelPlan.of(
            self.attention_plan,
            group=q.shape[1] // keys.shape[1],
            num_kv_heads=keys.shape[1],
            num_threads=torch.get_num_threads(),
            dot_max_queries=self.kernel.dot_max_queries,
            rows=rows,
        )

