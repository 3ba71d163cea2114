"""The native engine's step scheduler: groups admitted under the KV accounting, packed steps, frees.

Plain data in, plain data out (`steps`); the runner does the tensors, sampling and stop
rules, and tells the scheduler which sequences finished. The protocol, one call at a time:

    while not scheduler.is_done:
        while (admission := scheduler.admit()) is not None:
            scheduler.report(finished)      # of admission.starts, after drawing their tokens
        step = scheduler.schedule()        # None: nothing to compute now
        if step is not None:
            scheduler.report(finished)      # of step.decode_rows and step.starts

- Admission (BatchLLM): groups enter in the plan's order while the slots hold their new
  nodes and their members' own segments (`max(max_tokens, 1)` slots each: a sequence's
  generated tokens); a group that does not fit waits for frees, and the next group is never
  admitted ahead of it. A store with nothing in flight that cannot hold a group is an error.
- Steps (SARATHI): every running sequence's decode row first, then prefill chunks of the
  admitted nodes, parents first, up to `max_step_tokens` rows; a long node is chunked over
  steps. A node with requests ending at it gets a logits row for its last token.
- A sequence starts (draws its first token) as soon as its prompt's node is fully
  prefilled: after that step, or at admission when the node already has logits (they are
  kept while the node lives). Afterwards it decodes once per step until reported finished.
- A finished sequence frees its segment at once; a node is freed when the last group that
  needs it (`Plan.node_first_group` .. `node_last_group`) has finished.

Invariants: each node is prefilled exactly once; slots in use never exceed the allocator's
capacity; a segment's `num_keys` never passes its reservation when the runner finishes
sequences by their `max_tokens`.

in → out: `Plan` + per-request `max_tokens` + a `SlotAllocator` → `Admission`s and `Step`s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from itertools import chain

import numpy as np

from prefixbatch.packing.slots import SlotAllocator
from prefixbatch.packing.steps import (
    Admission,
    DecodeRow,
    PrefillChunk,
    ScoredRows,
    Segment,
    Start,
    Step,
)
from prefixbatch.prefix_tree import ROOT, Group, Plan

__all__ = ["StepScheduler"]


class StepScheduler:
    """Decides every admission and step of one plan; told back which sequences finished."""

    def __init__(
        self,
        plan: Plan,
        max_tokens: Sequence[int],
        *,
        slots: SlotAllocator,
        max_step_tokens: int,
        logits_from: Sequence[int | None] | None = None,
    ) -> None:
        """logits_from: per node, the first token offset from which every row of the node gets
        logits (prompt logprobs, scoring: `ScoredRows`); None (or no list): only its last."""
        if len(max_tokens) != plan.num_requests:
            msg = (
                f"`max_tokens` must have one entry per plan request ({plan.num_requests}), "
                f"got {len(max_tokens)}"
            )
            raise ValueError(msg)
        if max_step_tokens < 1:
            raise ValueError(f"`max_step_tokens` must be at least 1, got {max_step_tokens}")
        self.plan = plan
        self.slots = slots
        self.max_step_tokens = max_step_tokens
        self.peak_used_tokens = 0  # most slots held at once, a reservation undone included
        self._max_tokens = [int(m) for m in max_tokens]
        # Plain lists: read per chunk and per row, where numpy scalars cost more than the work.
        self._num_nodes = plan.num_nodes
        self._node_parent = plan.node_parent.tolist()
        self._node_num_tokens = plan.node_num_tokens.tolist()
        self._node_token_start = plan.node_token_start.tolist()
        self._request_node = plan.request_node.tolist()
        self._has_requests = (np.bincount(plan.request_node, minlength=plan.num_nodes) > 0).tolist()
        self._node_groups_left = (plan.node_last_group - plan.node_first_group + 1).tolist()
        self._logits_from = list(logits_from) if logits_from is not None else [None] * plan.num_nodes
        self._next_group = 0
        self._prefill: deque[list[int]] = deque()  # [node, tokens done], parents first
        self._waiting: dict[int, list[int]] = {}  # end node → request ids awaiting its logits
        self._running: list[int] = []  # request ids decoding, in row order
        self._num_generated: dict[int, int] = {}  # request id → tokens drawn so far
        self._group_of: dict[int, int] = {}  # request id → its group, while it runs
        self._members_left: dict[int, int] = {}  # group id → members not finished
        self._group_nodes: dict[int, tuple[int, ...]] = {}  # group id → the nodes it needs
        self._has_logits: set[int] = set()  # live nodes whose last-token logits were computed
        self._segments: dict[int, Segment] = {}  # every live segment, by id
        self._admitted: list[int] = []  # groups admitted since the last step
        self._freed: list[int] = []  # segments freed since the last step
        self._pending: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (decodes, starts)

    @property
    def is_done(self) -> bool:
        """Every group admitted, every node prefilled, every sequence finished and reported."""
        return (
            self._next_group == self.plan.num_groups
            and self._pending is None
            and not (self._running or self._waiting or self._prefill)
        )

    # Admission -------------------------------------------------------------------------

    def admit(self) -> Admission | None:
        """Admits the next group when its segments fit; None when it waits or none is left."""
        self._check_reported()
        if self._next_group == self.plan.num_groups:
            return None
        group = self.plan.group(self._next_group)
        new_nodes = [x for x in group.new_node_ids if x != ROOT]
        if not self._reserve(group, new_nodes):
            return None
        self._next_group += 1
        self._admitted.append(group.group_id)
        self._prefill.extend([x, 0] for x in new_nodes)
        self._members_left[group.group_id] = len(group.request_ids)
        self._group_nodes[group.group_id] = group.node_ids
        for request_id in group.request_ids:
            self._group_of[request_id] = group.group_id
            self._waiting.setdefault(self._request_node[request_id], []).append(request_id)
        starts = self._pop_ready()
        if starts:  # they draw now and may finish at once, freeing slots for the next group
            self._pending = ((), tuple(s.request_id for s in starts))
        return Admission(group.group_id, group.request_ids, starts)

    def _reserve(self, group: Group, new_nodes: list[int]) -> bool:
        """Slots for the group's new nodes and its members' segments, all or none."""
        # A member's own segment right after its prompt's node: where nobody else attends to
        # that node, the two are one key range (`attention_plan`: one product, no merge).
        members: dict[int, list[int]] = {}
        for r in group.request_ids:
            members.setdefault(self._request_node[r], []).append(r)
        sizes, is_new = [], set(new_nodes)
        for x in [*new_nodes, *(x for x in members if x not in is_new)]:
            if x in is_new:
                sizes.append((x, self._parent(x), self._node_num_tokens[x]))
            sizes += [(self._num_nodes + r, x, self._max_tokens[r]) for r in members.get(x, ())]
        is_idle = not (self._running or self._waiting or self._prefill)
        if not is_idle and sum(size for *_, size in sizes) > self.slots.num_free_tokens:
            return False
        placed = []
        for segment_id, parent_id, size in sizes:
            if not self._allocate(segment_id, parent_id, size):
                for undo in placed:  # fragmented: wait for frees, keep the plan's order
                    self.slots.free(undo)
                    del self._segments[undo]
                if is_idle:
                    capacity = self.slots.capacity_tokens
                    msg = f"KV store of {capacity} tokens cannot hold group {group.group_id}"
                    raise RuntimeError(msg)
                return False
            placed.append(segment_id)
        return True

    def _allocate(self, segment_id: int, parent_id: int | None, num_tokens: int) -> bool:
        slots = self.slots.allocate(segment_id, max(num_tokens, 1))
        if slots is None:
            return False
        self._segments[segment_id] = Segment(segment_id, parent_id, slots.start, 0)
        self.peak_used_tokens = max(self.peak_used_tokens, self.slots.num_used_tokens)
        return True

    def _parent(self, node: int) -> int | None:
        parent = self._node_parent[node]
        return None if parent == ROOT else parent

    def _pop_ready(self) -> tuple[Start, ...]:
        """Waiting sequences whose prompt's node has logits, by node in the order they waited."""
        starts: list[Start] = []
        for node in [x for x in self._waiting if x in self._has_logits]:
            starts += [Start(r, node) for r in self._waiting.pop(node)]
        return tuple(starts)

    # Steps -----------------------------------------------------------------------------

    def schedule(self) -> Step | None:
        """The next forward pass: decode rows, then prefill chunks; None when there is no row."""
        self._check_reported()
        decode_rows = self._decode_rows()
        chunks, logits_nodes, logits_rows, scored = self._prefill_chunks(len(decode_rows))
        num_rows = len(decode_rows) + sum(c.num_tokens for c in chunks)
        if num_rows == 0:
            if self._waiting:  # nothing left to prefill: their nodes would never get logits
                raise RuntimeError(
                    f"requests ending at nodes {sorted(self._waiting)} can never start"
                )
            return None
        starts = self._pop_ready()
        step = Step(
            admitted_group_ids=tuple(self._admitted),
            freed_segment_ids=tuple(self._freed),
            decode_rows=decode_rows,
            prefill_chunks=chunks,
            num_rows=num_rows,
            logits_rows=(*range(len(decode_rows)), *logits_rows),
            logits_nodes=logits_nodes,
            starts=starts,
            segments=tuple(self._segments.values()),
            scored=scored,
        )
        self._admitted, self._freed = [], []
        self._pending = (tuple(self._running), tuple(s.request_id for s in starts))
        self._running = []
        return step

    def _decode_rows(self) -> tuple[DecodeRow, ...]:
        rows = []
        for request_id in self._running:
            num_fed = self._num_generated[request_id]  # the newest token is at num_fed - 1
            segment_id = self._num_nodes + request_id
            rows.append(DecodeRow(request_id, segment_id, num_fed - 1))
            self._set_num_keys(segment_id, num_fed)
        return tuple(rows)

    def _prefill_chunks(
        self, num_rows: int
    ) -> tuple[tuple[PrefillChunk, ...], tuple[int, ...], list[int], tuple[ScoredRows, ...]]:
        """Chunks off the prefill queue up to the step's budget → (chunks, logits nodes, their
        rows then the scored rows, scored rows)."""
        chunks, logits_nodes, logits_rows, scored, scored_rows = [], [], [], [], []
        while self._prefill and num_rows < self.max_step_tokens:
            chunk = self._next_chunk(num_rows)
            chunks.append(chunk)
            num_rows += chunk.num_tokens
            is_complete = chunk.offset + chunk.num_tokens == self._node_num_tokens[chunk.node_id]
            if is_complete and self._has_requests[chunk.node_id]:
                # Kept while the node lives: members of later groups may end here too.
                self._has_logits.add(chunk.node_id)
                logits_nodes.append(chunk.node_id)
                logits_rows.append(num_rows - 1)
            first = self._logits_from[chunk.node_id]
            if first is not None and chunk.offset + chunk.num_tokens > first:
                first = max(first, chunk.offset)
                count = chunk.offset + chunk.num_tokens - first
                scored.append(ScoredRows(chunk.node_id, first, count))
                start_row = chunk.first_row + first - chunk.offset
                scored_rows.extend(range(start_row, start_row + count))
        return tuple(chunks), tuple(logits_nodes), logits_rows + scored_rows, tuple(scored)

    def _next_chunk(self, first_row: int) -> PrefillChunk:
        entry = self._prefill[0]
        node, done = entry
        take = min(self._node_num_tokens[node] - done, self.max_step_tokens - first_row)
        self._set_num_keys(node, done + take)
        if done + take < self._node_num_tokens[node]:
            entry[1] = done + take
        else:
            self._prefill.popleft()
        return PrefillChunk(node, first_row, done, take, self._node_token_start[node] + done)

    def _set_num_keys(self, segment_id: int, num_keys: int) -> None:
        segment = self._segments[segment_id]
        self._segments[segment_id] = Segment(
            segment_id, segment.parent_id, segment.key_start, num_keys
        )

    # Reports and frees -----------------------------------------------------------------

    def report(self, finished: Iterable[int] = ()) -> tuple[int, ...]:
        """Which sequences of the last admission or step finished (stop rule or length).

        → the segments that freed, in order: theirs, and nodes whose last group is done.
        """
        finished = set(finished)
        num_freed = len(self._freed)
        decodes, starts = self._pending or ((), ())
        unknown = finished.difference(decodes, starts)
        if unknown:
            msg = f"finished requests {sorted(unknown)} did not run in the last admission or step"
            raise ValueError(msg)
        self._pending = None
        for request_id in decodes:
            self._num_generated[request_id] += 1
        for request_id in starts:
            self._num_generated[request_id] = 1
        self._running += [r for r in chain(decodes, starts) if r not in finished]
        for request_id in chain(decodes, starts):  # frees in the order the rows were drawn
            if request_id in finished:
                self._finish(request_id)
        return tuple(self._freed[num_freed:])

    def _finish(self, request_id: int) -> None:
        del self._num_generated[request_id]
        self._release(self._num_nodes + request_id)
        group_id = self._group_of.pop(request_id)
        self._members_left[group_id] -= 1
        if self._members_left[group_id] > 0:
            return
        del self._members_left[group_id]
        for node in self._group_nodes.pop(group_id):
            if node == ROOT:
                continue
            self._node_groups_left[node] -= 1
            if self._node_groups_left[node] == 0:
                self._release(node)

    def _release(self, segment_id: int) -> None:
        self.slots.free(segment_id)
        del self._segments[segment_id]
        self._has_logits.discard(segment_id)
        self._freed.append(segment_id)

    def _check_reported(self) -> None:
        if self._pending is not None:
            raise RuntimeError(
                "report() which sequences of the last admission or step finished first"
            )
