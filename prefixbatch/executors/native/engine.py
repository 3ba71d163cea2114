"""The native engine loop, part 1: a plan run group by group, every shared segment computed once.

For each group of the planner's `Plan`, in order:
1. prefill the group's new tree nodes, parents first, packed into steps of at most
   `max_step_tokens` rows (a long node is chunked; a child may ride in its parent's last
   step, since every layer stores a step's k, v before attending);
2. give each member request its own segment (a child of the node its prompt ends at) sized
   for its `max_tokens`, and draw its first token from the logits of that node's last token
   (kept per node while the node lives, so a later group of the same prompt reuses them);
3. decode all members together, one token each per step, with shared-prefix attention: the
   rows of every sequence under a node attend to that node's KV in one product;
   a finished sequence frees its segment at once;
4. free the nodes whose last group this was (`Plan.node_last_group`).

Invariants: a node's KV is computed exactly once and lives exactly [first group, last
group]; prefill tokens computed == the plan's unique prompt tokens; each request draws from
its own seeded generator, so its completion never depends on its batch mates.

in → out: requests + their plan → completions, group by group.
"""

from __future__ import annotations

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
from prefixbatch.executors.stopping import RowFinish, StopRule, cut_at_stop, row_finish
from prefixbatch.prefix_tree import ROOT, Plan
from prefixbatch.types import Completion, Request


@dataclass
class _Sequence:
    """One request being decoded."""

    request: Request
    segment_id: int  # its own segment: the generated tokens' KV
    end_node: int  # the tree node its prompt ends at
    num_cached_tokens: int
    rule: StopRule
    generator: torch.Generator | None  # None: greedy
    generated: list[int] = field(default_factory=list)
    finish: RowFinish | None = None
    is_reported: bool = False  # its completion was yielded


@dataclass
class _Step:
    """One forward pass being assembled: flat token rows and the runs they belong to."""

    token_ids: list[int] = field(default_factory=list)
    runs: list[QueryRun] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)
    logits_nodes: list[int] = field(default_factory=list)  # node whose last token each row is


class Engine:
    """Runs plans on one model and one KV store."""

    def __init__(
        self,
        model: CausalLM,
        *,
        eos_token_ids: Sequence[int],
        decode: Callable[[list[int]], str],
        max_step_tokens: int,
    ) -> None:
        self.model = model
        self.eos_token_ids = tuple(eos_token_ids)
        self.decode = decode
        self.max_step_tokens = max_step_tokens
        self.stats = ExecutorStats()

    def run(self, requests: Sequence[Request], plan: Plan, tokens: np.ndarray) -> Iterator[Completion]:
        """Completions of `requests` (plan request i = requests[i]); `tokens` is the plan's token array."""
        if not requests:
            return
        run = _PlanRun(self, requests, plan, tokens)
        for group_id in range(plan.num_groups):
            yield from run.group(group_id)


class _PlanRun:
    """The state of one plan being executed: live segments, node logits, the KV store."""

    def __init__(self, engine: Engine, requests: Sequence[Request], plan: Plan, tokens: np.ndarray) -> None:
        self.engine = engine
        self.model = engine.model
        self.requests = requests
        self.plan = plan
        self.tokens = tokens
        # Contiguous slot ranges fragment; room to spare keeps first-fit from failing.
        capacity = int(plan.group_kv_tokens.max(initial=1) * 3 // 2) + 64
        self.store = KVStore.for_model(
            self.model.config, capacity_tokens=capacity, dtype=self.model.dtype, device=self.model.device
        )
        self.segments: dict[int, SegmentKV] = {}
        self.node_logits: dict[int, torch.Tensor] = {}  # [V] logits after a node's last token
        self.has_requests = np.bincount(plan.request_node, minlength=plan.num_nodes) > 0
        self.position = np.empty(plan.num_requests, np.int64)  # request id → position in order
        self.position[plan.request_order] = np.arange(plan.num_requests)

    def group(self, group_id: int) -> Iterator[Completion]:
        group = self.plan.group(group_id)
        self._prefill([x for x in group.new_node_ids if x != ROOT])
        sequences = [self._start(request_id) for request_id in group.request_ids]
        yield from self._finished(sequences)
        while any(s.finish is None for s in sequences):
            self._decode_step([s for s in sequences if s.finish is None])
            yield from self._finished(sequences)
        for node in group.node_ids:
            if node != ROOT and self.plan.node_last_group[node] == group_id:
                self._free(node)

    # Prefill ---------------------------------------------------------------------------

    def _prefill(self, nodes: list[int]) -> None:
        """The nodes' segments (parents first), packed and chunked into steps."""
        step = _Step()
        for node in nodes:
            length = int(self.plan.node_num_tokens[node])
            start = int(self.plan.node_token_start[node])
            self._allocate(node, self._parent(node), length)
            offset = 0
            while offset < length:
                take = min(length - offset, self.engine.max_step_tokens - len(step.token_ids))
                step.runs.append(QueryRun(node, len(step.token_ids), offset, take))
                step.token_ids.extend(self.tokens[start + offset : start + offset + take].tolist())
                offset += take
                self._set_num_keys(node, offset)
                if offset == length and self.has_requests[node]:
                    step.logits_rows.append(len(step.token_ids) - 1)
                    step.logits_nodes.append(node)
                if len(step.token_ids) == self.engine.max_step_tokens:
                    self._prefill_step(step)
                    step = _Step()
        if step.token_ids:
            self._prefill_step(step)

    def _prefill_step(self, step: _Step) -> None:
        logits = self._forward(step)
        for node, row in zip(step.logits_nodes, logits):
            self.node_logits[node] = row
        self.engine.stats.num_prefill_tokens += len(step.token_ids)

    # Decode ----------------------------------------------------------------------------

    def _start(self, request_id: int) -> _Sequence:
        request = self.requests[request_id]
        params = request.sampling
        end_node = int(self.plan.request_node[request_id])
        segment_id = self.plan.num_nodes + request_id
        self._allocate(segment_id, end_node, params.max_tokens)
        generator = None
        if not params.is_greedy:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        sequence = _Sequence(
            request=request,
            segment_id=segment_id,
            end_node=end_node,
            num_cached_tokens=int(self.plan.request_num_cached_tokens[self.position[request_id]]),
            rule=StopRule.of(params, self.engine.eos_token_ids),
            generator=generator,
        )
        self._append([sequence], self.node_logits[end_node][None, :])
        return sequence

    def _decode_step(self, active: list[_Sequence]) -> None:
        step = _Step()
        for row, sequence in enumerate(active):
            num_fed = len(sequence.generated)  # the newest token is fed back at offset num_fed - 1
            step.runs.append(QueryRun(sequence.segment_id, row, num_fed - 1, 1))
            step.token_ids.append(sequence.generated[-1])
            step.logits_rows.append(row)
            self._set_num_keys(sequence.segment_id, num_fed)
        logits = self._forward(step)  # [S, V]
        self.engine.stats.num_decode_tokens += len(active)
        self._append(active, logits)

    def _append(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """Draw one token per sequence from its logits row [S, V] and check whether it ends."""
        tokens = logits.argmax(dim=-1)  # [S] greedy; the first maximum, as transformers picks
        sampled = [i for i, s in enumerate(sequences) if s.generator is not None]
        if sampled:
            params = [sequences[i].request.sampling for i in sampled]
            device = logits.device
            drawn = draw_tokens(
                logits[sampled],
                torch.tensor([p.temperature for p in params], device=device),
                torch.tensor([p.top_k or 0 for p in params], device=device),
                torch.tensor([p.top_p for p in params], device=device),
                [sequences[i].generator for i in sampled],
            )
            tokens[sampled] = drawn
        for sequence, token in zip(sequences, tokens.tolist()):
            sequence.generated.append(token)
            text = self.engine.decode(sequence.generated) if sequence.rule.stop else ""
            sequence.finish = row_finish(sequence.rule, len(sequence.generated), token, text)
            if sequence.finish is not None:
                self._free(sequence.segment_id)

    def _finished(self, sequences: list[_Sequence]) -> Iterator[Completion]:
        for sequence in sequences:
            if sequence.finish is not None and not sequence.is_reported:
                sequence.is_reported = True
                yield self._completion(sequence)

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

    def _allocate(self, segment_id: int, parent_id: int | None, num_tokens: int) -> None:
        slots = self.store.allocate(segment_id, max(num_tokens, 1))
        if slots is None:  # the plan's groups fit the budget: only fragmentation gets here
            msg = (
                f"KV store of {self.store.capacity_tokens} tokens cannot place {num_tokens} more "
                f"({self.store.num_free_tokens} free, largest range {self.store.largest_free_range})"
            )
            raise RuntimeError(msg)
        self.segments[segment_id] = SegmentKV(segment_id, parent_id, slots.start, 0)

    def _set_num_keys(self, segment_id: int, num_keys: int) -> None:
        segment = self.segments[segment_id]
        self.segments[segment_id] = SegmentKV(segment_id, segment.parent_id, segment.key_start, num_keys)

    def _free(self, segment_id: int) -> None:
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
