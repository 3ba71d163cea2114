"""The native engine loop: the plan's groups admitted by KV memory, packed steps, continuous batching.

Each step is one flat, unpadded batch: the decode token of every running sequence, then
prefill chunks of the admitted groups' new tree nodes (parents first, long nodes chunked)
up to `max_step_tokens` rows (SARATHI: decodes ride along with prefill).

- Admission (BatchLLM): groups enter in the plan's order while the KV store can hold their
  new nodes and their members' own segments (suffix-free: each member's segment holds its
  generated tokens, `max_tokens` slots); a group that fits nowhere waits for frees, and the
  next group is never admitted ahead of it. The store holds `kv_budget_tokens`.
- A sequence starts as soon as the node its prompt ends at is fully prefilled: its first
  token is drawn from that node's last-token logits (kept while the node lives, so members
  of later groups reuse them). A finished sequence frees its segment at once.
- A node is freed when every group that needs it has finished (`Plan.node_first_group` ..
  `node_last_group`), so its KV lives exactly while its groups run.

Invariants: each node's KV is computed exactly once (prefill tokens == the plan's unique
tokens); every request draws from its own seeded generator, so its completion depends
neither on its batch mates nor on the order the job runs in; attention is exact (tree
attention merged by log-sum-exp), so greedy outputs match full attention.

in → out: requests + their plan → completions, as they finish.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from prefixbatch.executors.base import ExecutorStats
from prefixbatch.executors.native.attention_plan import QueryRun, SegmentKV, build_plan
from prefixbatch.executors.native.kv import KVStore
from prefixbatch.executors.native.model import CausalLM
from prefixbatch.executors.native.tree_attention import TreeAttention
from prefixbatch.executors.sampling import draw_tokens
from prefixbatch.faults import fault_point
from prefixbatch.executors.stopping import RowFinish, StopRule, cut_at_stop, row_finish
from prefixbatch.prefix_tree import ROOT, Plan
from prefixbatch.types import Completion, Request


@dataclass
class _Sequence:
    """One request being decoded."""

    request: Request
    group_id: int
    segment_id: int  # its own segment: the generated tokens' KV
    end_node: int  # the tree node its prompt ends at
    num_cached_tokens: int
    rule: StopRule
    generator: torch.Generator | None  # None: greedy
    generated: list[int] = field(default_factory=list)
    finish: RowFinish | None = None


@dataclass
class _Step:
    """One forward pass being assembled: flat token rows and the runs they belong to."""

    token_ids: list[int] = field(default_factory=list)
    runs: list[QueryRun] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)
    decoding: list[_Sequence] = field(default_factory=list)  # rows 0.. are theirs, in order
    logits_nodes: list[int] = field(default_factory=list)  # node whose last token each later row is


class Engine:
    """Runs plans on one model, within a KV store of `kv_budget_tokens`."""

    def __init__(
        self,
        model: CausalLM,
        *,
        eos_token_ids: Sequence[int],
        decode: Callable[[list[int]], str],
        max_step_tokens: int,
        kv_budget_tokens: int,
    ) -> None:
        self.model = model
        self.eos_token_ids = tuple(eos_token_ids)
        self.decode = decode
        self.max_step_tokens = max_step_tokens
        self.kv_budget_tokens = kv_budget_tokens
        self.stats = ExecutorStats()
        self.kv_buffer: torch.Tensor | None = None  # the last run's KV memory, reused by the next

    def run(self, requests: Sequence[Request], plan: Plan, tokens: np.ndarray) -> Iterator[Completion]:
        """Completions of `requests` (plan request i = requests[i]); `tokens` is the plan's token array."""
        if requests:
            yield from _PlanRun(self, requests, plan, tokens).completions()


def _most_tokens_held(requests: Sequence[Request], plan: Plan) -> int:
    """Slots of every segment the run allocates (each tree node, each request's own), at once."""
    nodes = np.maximum(np.delete(plan.node_num_tokens, ROOT), 1).sum()
    own = sum(max(request.sampling.max_tokens, 1) for request in requests)
    return int(nodes) + own


class _PlanRun:
    """The state of one plan being executed: admitted groups, live segments, node logits."""

    def __init__(self, engine: Engine, requests: Sequence[Request], plan: Plan, tokens: np.ndarray) -> None:
        self.engine = engine
        self.model = engine.model
        self.requests = requests
        self.plan = plan
        self.tokens = tokens
        # An over-budget single request still has to fit on its own; and the store needs no
        # more than every segment of the plan at once (allocated zeroed: sized to the job).
        capacity = max(engine.kv_budget_tokens, int(plan.group_kv_tokens.max(initial=1)))
        capacity = min(capacity, _most_tokens_held(requests, plan))
        self.store = KVStore.for_model(
            self.model.config,
            capacity_tokens=capacity,
            dtype=self.model.dtype,
            device=self.model.device,
            buffer=engine.kv_buffer,
        )
        engine.kv_buffer = self.store.buffer
        self.segments: dict[int, SegmentKV] = {}
        self.node_logits: dict[int, torch.Tensor] = {}  # [V] logits after a node's last token
        self.node_groups_left = plan.node_last_group - plan.node_first_group + 1  # [m]
        self.has_requests = np.bincount(plan.request_node, minlength=plan.num_nodes) > 0
        self.position = np.empty(plan.num_requests, np.int64)  # request id → position in order
        self.position[plan.request_order] = np.arange(plan.num_requests)
        self.next_group = 0
        self.prefill: deque[list[int]] = deque()  # [node, tokens done] parents first
        self.waiting: dict[int, list[_Sequence]] = {}  # end node → sequences awaiting its logits
        self.running: list[_Sequence] = []
        self.group_members_left: dict[int, int] = {}
        self.done: list[Completion] = []

    def completions(self) -> Iterator[Completion]:
        while self.next_group < self.plan.num_groups or self.running or self.waiting or self.prefill:
            while self.next_group < self.plan.num_groups and self._admit(self.next_group):
                self.next_group += 1
            self._step()
            yield from self.done
            self.done = []

    # Admission -------------------------------------------------------------------------

    def _admit(self, group_id: int) -> bool:
        """Reserve the group's new nodes and its members' segments, or nothing if they don't fit."""
        group = self.plan.group(group_id)
        new_nodes = [x for x in group.new_node_ids if x != ROOT]
        sizes = [(x, self._parent(x), int(self.plan.node_num_tokens[x])) for x in new_nodes]
        sizes += [
            (self.plan.num_nodes + r, int(self.plan.request_node[r]), self.requests[r].sampling.max_tokens)
            for r in group.request_ids
        ]
        is_idle = not (self.running or self.waiting or self.prefill)
        if not is_idle and sum(size for *_, size in sizes) > self.store.num_free_tokens:
            return False
        placed = []
        for segment_id, parent, size in sizes:
            if not self._allocate(segment_id, parent, size):
                for undo in placed:  # fragmented: wait for frees, keep the plan's order
                    self._release(undo)
                if is_idle:
                    raise RuntimeError(f"KV store of {self.store.capacity_tokens} tokens cannot hold group {group_id}")
                return False
            placed.append(segment_id)
        self.prefill.extend([x, 0] for x in new_nodes)
        self.group_members_left[group_id] = len(group.request_ids)
        for request_id in group.request_ids:
            sequence = self._sequence(request_id, group_id)
            self.waiting.setdefault(sequence.end_node, []).append(sequence)
        self._start_ready()
        return True

    def _sequence(self, request_id: int, group_id: int) -> _Sequence:
        request = self.requests[request_id]
        params = request.sampling
        generator = None
        if not params.is_greedy:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        return _Sequence(
            request=request,
            group_id=group_id,
            segment_id=self.plan.num_nodes + request_id,
            end_node=int(self.plan.request_node[request_id]),
            num_cached_tokens=int(self.plan.request_num_cached_tokens[self.position[request_id]]),
            rule=StopRule.of(params, self.engine.eos_token_ids),
            generator=generator,
        )

    def _start_ready(self) -> None:
        """Sequences whose prompt's last node has logits draw their first token."""
        for node in [x for x in self.waiting if x in self.node_logits]:
            sequences = self.waiting.pop(node)
            self._append(sequences, self.node_logits[node].expand(len(sequences), -1))
            self.running += [s for s in sequences if s.finish is None]

    # Steps -----------------------------------------------------------------------------

    def _step(self) -> None:
        """One forward pass: every running sequence's next token, then prefill chunks."""
        step = _Step(decoding=self.running)
        self.running = []
        for row, sequence in enumerate(step.decoding):
            num_fed = len(sequence.generated)  # the newest token is fed back at offset num_fed - 1
            step.runs.append(QueryRun(sequence.segment_id, row, num_fed - 1, 1))
            step.token_ids.append(sequence.generated[-1])
            step.logits_rows.append(row)
            self._set_num_keys(sequence.segment_id, num_fed)
        while self.prefill and len(step.token_ids) < self.engine.max_step_tokens:
            self._add_chunk(step)
        if not step.token_ids:
            return
        if len(step.token_ids) > len(step.decoding):
            fault_point("prefill")
        if step.decoding:
            fault_point("decode")
        logits = self._forward(step)
        num_decoding = len(step.decoding)
        self.engine.stats.num_decode_tokens += num_decoding
        self.engine.stats.num_prefill_tokens += len(step.token_ids) - num_decoding
        for node, row in zip(step.logits_nodes, logits[num_decoding:]):
            self.node_logits[node] = row
        self._append(step.decoding, logits[:num_decoding])
        self.running += [s for s in step.decoding if s.finish is None]
        self._start_ready()

    def _add_chunk(self, step: _Step) -> None:
        node, done = self.prefill[0]
        length = int(self.plan.node_num_tokens[node])
        take = min(length - done, self.engine.max_step_tokens - len(step.token_ids))
        start = int(self.plan.node_token_start[node]) + done
        step.runs.append(QueryRun(node, len(step.token_ids), done, take))
        step.token_ids.extend(self.tokens[start : start + take].tolist())
        self._set_num_keys(node, done + take)
        if done + take < length:
            self.prefill[0][1] = done + take
            return
        self.prefill.popleft()
        if self.has_requests[node]:  # kept while the node lives: later groups may end here too
            step.logits_rows.append(len(step.token_ids) - 1)
            step.logits_nodes.append(node)

    def _append(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """Draw one token per sequence from its logits row [S, V]; finish and free those that end."""
        if not sequences:
            return
        tokens = logits.argmax(dim=-1)  # [S] greedy; the first maximum, as transformers picks
        sampled = [i for i, s in enumerate(sequences) if s.generator is not None]
        if sampled:
            params = [sequences[i].request.sampling for i in sampled]
            device = logits.device
            tokens[sampled] = draw_tokens(
                logits[sampled],
                torch.tensor([p.temperature for p in params], device=device),
                torch.tensor([p.top_k or 0 for p in params], device=device),
                torch.tensor([p.top_p for p in params], device=device),
                [sequences[i].generator for i in sampled],
            )
        for sequence, token in zip(sequences, tokens.tolist()):
            sequence.generated.append(token)
            text = self.engine.decode(sequence.generated) if sequence.rule.stop else ""
            sequence.finish = row_finish(sequence.rule, len(sequence.generated), token, text)
            if sequence.finish is not None:
                self._finish(sequence)

    def _finish(self, sequence: _Sequence) -> None:
        self._release(sequence.segment_id)
        self.done.append(self._completion(sequence))
        self.group_members_left[sequence.group_id] -= 1
        if self.group_members_left[sequence.group_id] == 0:
            del self.group_members_left[sequence.group_id]
            for node in self.plan.group(sequence.group_id).node_ids:
                if node == ROOT:
                    continue
                self.node_groups_left[node] -= 1
                if self.node_groups_left[node] == 0:
                    self._release(node)

    def _completion(self, sequence: _Sequence) -> Completion:
        token_ids = tuple(sequence.generated[: sequence.finish.num_tokens])
        return Completion(
            row_index=sequence.request.row_index,
            token_ids=token_ids,
            text=cut_at_stop(self.engine.decode(list(token_ids)), sequence.rule.stop),
            finish_reason=sequence.finish.reason,
            num_prompt_tokens=sequence.request.num_prompt_tokens,
            num_cached_prompt_tokens=sequence.num_cached_tokens,
            sample_index=sequence.request.sample_index,
        )

    # Segments and the forward pass ----------------------------------------------------

    def _parent(self, node: int) -> int | None:
        parent = int(self.plan.node_parent[node])
        return None if parent == ROOT else parent

    def _allocate(self, segment_id: int, parent_id: int | None, num_tokens: int) -> bool:
        slots = self.store.allocate(segment_id, max(num_tokens, 1))
        if slots is None:
            return False
        self.segments[segment_id] = SegmentKV(segment_id, parent_id, slots.start, 0)
        stats = self.engine.stats
        stats.peak_kv_tokens = max(stats.peak_kv_tokens, self.store.num_used_tokens)
        return True

    def _set_num_keys(self, segment_id: int, num_keys: int) -> None:
        segment = self.segments[segment_id]
        self.segments[segment_id] = SegmentKV(segment_id, segment.parent_id, segment.key_start, num_keys)

    def _release(self, segment_id: int) -> None:
        self.store.free(segment_id)
        del self.segments[segment_id]
        self.node_logits.pop(segment_id, None)

    def _forward(self, step: _Step) -> torch.Tensor:
        """Logits [len(step.logits_rows), V] fp32 of one packed step."""
        attention_plan = build_plan(list(self.segments.values()), step.runs)
        device = self.model.device
        attention = TreeAttention(self.store, attention_plan, scale=self.model.config.attention_scale)
        with torch.inference_mode():
            logits = self.model(
                torch.tensor(step.token_ids, dtype=torch.long, device=device),
                attention.plan.positions,
                attention,
                logits_rows=torch.tensor(step.logits_rows, dtype=torch.long, device=device),
            )
        self.engine.stats.num_steps += 1
        return logits
