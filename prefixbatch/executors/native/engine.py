"""The native engine loop: schedule (packing) → run the model on the step → sample, stop → report.

`packing.StepScheduler` decides everything that is plain data: which of the plan's groups
is admitted when, under the KV store's slot accounting (BatchLLM); what each step holds,
every running sequence's decode row then prefill chunks of the admitted nodes up to
`max_step_tokens` rows (SARATHI: decodes ride along with prefill); and which segments are
freed. This module runs its decisions, one unit each:

- `_forward`: a `Step` → the attention plan over its live segments, `TreeAttention` over the
  KV store, one forward pass → logits of the step's logits rows;
- `_next_tokens` + `_PlanRun._append`: one token per sequence from its logits row (greedy,
  or its own seeded stream), then its stop rules → which sequences finished, reported
  back to the scheduler (it cannot know: sampling and stop rules decide);
- `_PlanRun`: the loop, each sequence's tokens, and each node's last-token logits: a
  sequence starts as soon as its prompt's node is fully prefilled, drawing its first token
  from those logits (kept while the node lives, so members of later groups reuse them).

Invariants: each node's KV is computed exactly once (prefill tokens == the plan's unique
tokens); every request draws from its own seeded stream (`sampling.uniforms`), so its draws depend neither on
its batch mates nor on the order the job runs in (its logits do, in fp32's last bits, unless
`batch_invariant`: see `invariant`); attention is exact (tree attention merged by
log-sum-exp), so greedy outputs match full attention.

in → out: requests + their plan → completions, as they finish.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from itertools import groupby
from operator import attrgetter

import numpy as np
import torch

from prefixbatch.executors.base import ExecutorStats, StopFlag
from prefixbatch.executors.grammar import LazyConstraints, Matcher
from prefixbatch.executors.native.attention import tree
from prefixbatch.executors.native.attention.plan import QueryRun, SegmentKV, plan_attention
from prefixbatch.executors.native.kv import KVStore
from prefixbatch.executors.native.model import CausalLM
from prefixbatch.executors.native.prompt_scores import PromptScores
from prefixbatch.executors.sampling import (
    RawLogprob,
    TokenTexts,
    draw_tokens,
    needs_penalize,
    penalize,
    prompt_results,
    token_logprobs,
    uniforms,
)
from prefixbatch.executors.stopping import RowFinish, StopRule, cut_at_stop, row_finish
from prefixbatch.faults import fault_point
from prefixbatch.packing import Admission, Start, Step, StepScheduler, store_capacity
from prefixbatch.prefix_tree import Plan
from prefixbatch.types import Completion, Request, SamplingParams, error_completion


@dataclass
class _Sequence:
    """What the runner alone knows of a request being decoded: its tokens, sampler, stop rule."""

    request_id: int
    request: Request
    num_cached_tokens: int
    rule: StopRule
    seed: int | None  # its random stream's (`sampling.uniforms`); None: greedy
    generated: list[int] = field(default_factory=list)
    finish: RowFinish | None = None
    logprobs: list[RawLogprob] | None = None  # one per generated token, when asked for
    matcher: Matcher | None = None  # its grammar's state, when constrained
    error: str | None = None  # why it cannot run (a constraint that does not compile): an error row

    @cached_property
    def prompt_ids(self) -> frozenset[int]:
        """The prompt's distinct ids, for the repetition penalty (made once, at its first use)."""
        return frozenset(self.request.token_ids[: self.request.num_prompt_tokens])


class Engine:
    """Runs plans on one model; each in a KV store of the plan's `kv_budget_tokens`."""

    def __init__(
        self,
        model: CausalLM,
        *,
        eos_token_ids: Sequence[int],
        decode: Callable[[list[int]], str],
        token_texts: TokenTexts,
        constraints: LazyConstraints,
        max_step_tokens: int,
        batch_invariant: bool = False,
    ) -> None:
        self.model = model
        self.token_texts = token_texts  # logprobs' token texts
        self.constraints = constraints  # structured output's grammars, built at first use
        self.batch_invariant = batch_invariant  # see `invariant`: exact whatever the step
        self.eos_token_ids = tuple(eos_token_ids)
        self.decode = decode
        self.max_step_tokens = max_step_tokens
        self.stats = ExecutorStats()
        self.kv_buffer: torch.Tensor | None = None  # the last run's KV memory, reused by the next
        self.current: _PlanRun | None = None  # the run under way (or the last), for checkpoints

    def run(
        self, requests: Sequence[Request], plan: Plan, tokens: np.ndarray, *, stop: StopFlag | None = None
    ) -> Iterator[Completion]:
        """Completions of `requests` (plan request i = requests[i]) over the plan's `tokens`.
        Once `stop` is set, no further step runs: sequences in flight are not completed."""
        if requests:
            self.current = _PlanRun(self, requests, plan, tokens)
            with _collector_ignoring_older_objects():
                yield from self.current.completions(stop)

    def in_flight(self) -> dict[tuple[int, int], tuple[int, ...]]:
        """The generations under way in the current (or last) run: see `_PlanRun.in_flight`."""
        return self.current.in_flight() if self.current is not None else {}


@contextmanager
def _collector_ignoring_older_objects() -> Iterator[None]:
    """Python's cycle collector leaves the objects alive before the run (the libraries, the
    model: some 360,000) out of its passes until the run ends. A run allocates many small
    containers a step; a full pass over everything stalled a 4.4 s run for 0.21 s
    (BENCHMARKS.md). The run's own objects are collected as before."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _PlanRun:
    """One plan being executed: the scheduler's decisions, run on the model step by step."""

    def __init__(
        self, engine: Engine, requests: Sequence[Request], plan: Plan, tokens: np.ndarray
    ) -> None:
        self.engine = engine
        self.requests = requests
        self.plan = plan
        self.tokens = tokens
        max_tokens = [request.max_new_tokens for request in requests]  # own segments' slots
        # The budget the plan was made for (its groups fit it): one setting, recorded there.
        capacity = store_capacity(plan, max_tokens, kv_budget_tokens=plan.kv_budget_tokens)
        self.store = KVStore.for_model(
            engine.model.config,
            capacity_tokens=capacity,
            dtype=engine.model.dtype,
            device=engine.model.device,
            buffer=engine.kv_buffer,
        )
        engine.kv_buffer = self.store.buffer
        self.prompt_scores = PromptScores(plan, requests, tokens)
        self.scheduler = StepScheduler(
            plan, max_tokens, slots=self.store.allocator, max_step_tokens=engine.max_step_tokens,
            logits_from=self.prompt_scores.logits_from,
        )
        self.position = np.empty(plan.num_requests, np.int64)  # request id → position in order
        self.position[plan.request_order] = np.arange(plan.num_requests)
        self.sequences: dict[int, _Sequence] = {}  # by request id, admitted and not finished
        self.lock = threading.Lock()  # `in_flight` (a checkpoint thread) against token appends
        self.node_logits: dict[int, torch.Tensor] = {}  # [V] logits after a node's last token
        self.done: list[Completion] = []

    def in_flight(self) -> dict[tuple[int, int], tuple[int, ...]]:
        """(row, sample) → tokens generated so far (resumed ones included) of every sequence
        under way. Safe to call from another thread: each sequence's tokens are a prefix of
        its generation. A sequence that records logprobs is left out: a resume could not give
        its earlier tokens theirs, so it restarts from its prompt (to the same output)."""
        with self.lock:  # never a sequence caught between its last token and its finish
            return {
                (s.request.row_index, s.request.sample_index): tuple(s.generated)
                for s in self.sequences.values()
                if s.generated and s.finish is None and not s.request.sampling.records_logprobs
            }

    def completions(self, stop: StopFlag | None) -> Iterator[Completion]:
        scheduler = self.scheduler
        while not scheduler.is_done and not (stop is not None and stop.is_set()):
            while (admission := scheduler.admit()) is not None:
                scheduler.report(self._admit(admission))
            stats = self.engine.stats
            stats.peak_kv_tokens = max(stats.peak_kv_tokens, scheduler.peak_used_tokens)
            step = scheduler.schedule()
            if step is not None:
                scheduler.report(self._run(step))
            yield from self.done
            self.done = []

    def _admit(self, admission: Admission) -> list[int]:
        """The group's sequences; those whose node has logits draw now. → request ids finished."""
        for request_id in admission.request_ids:
            self.sequences[request_id] = self._sequence(request_id)
        return self._start(admission.starts)

    def _sequence(self, request_id: int) -> _Sequence:
        request = self.requests[request_id]
        params = request.sampling
        cached = int(self.plan.request_num_cached_tokens[self.position[request_id]])
        return _Sequence(
            request_id=request_id,
            request=request,
            num_cached_tokens=min(cached, request.num_prompt_tokens),
            rule=StopRule.of(params, self.engine.eos_token_ids),
            seed=None if params.is_greedy else params.seed,  # draw k is uniforms(seed, k): resumes need no replay
            generated=list(request.generated),  # stop rules and max_tokens count them too
            logprobs=None if params.logprobs is None else [],
            **self._constraint(request_id, params),
        )

    def _constraint(self, request_id: int, params: SamplingParams) -> dict:
        """The sequence's matcher, or its error when the constraint does not compile."""
        if not params.is_constrained:
            return {}
        matcher = self.engine.constraints.get().matcher(params)
        if isinstance(matcher, str):
            return {"error": matcher}
        for token in self.requests[request_id].generated:  # resumed: where the earlier run left it
            matcher.accept(token)
        return {"matcher": matcher}

    def _run(self, step: Step) -> list[int]:
        """One forward pass, then every decode row's and start's token. → request ids finished."""
        for segment_id in step.freed_segment_ids:
            self.node_logits.pop(segment_id, None)
            self.prompt_scores.free(segment_id)
        decoding = [self.sequences[row.request_id] for row in step.decode_rows]
        token_ids = [sequence.generated[-1] for sequence in decoding]
        for chunk in step.prefill_chunks:
            start = chunk.token_start
            token_ids += self.tokens[start : start + chunk.num_tokens].tolist()
        if step.prefill_chunks:
            fault_point("prefill")
        if decoding:
            fault_point("decode")
        model = self.engine.model
        logits = _forward(model, self.store, step, token_ids, self.engine.batch_invariant)  # [len(step.logits_rows), V]
        stats = self.engine.stats
        stats.num_steps += 1
        stats.num_decode_tokens += len(decoding)
        stats.num_prefill_tokens += step.num_rows - len(decoding)
        num_node_rows = len(decoding) + len(step.logits_nodes)
        for node, row in zip(step.logits_nodes, logits[len(decoding) : num_node_rows], strict=True):
            self.node_logits[node] = row
        self.prompt_scores.record(step.scored, logits[num_node_rows:])
        finished = self._draw(decoding, logits[: len(decoding)])
        return finished + self._start(step.starts)

    def _start(self, starts: Sequence[Start]) -> list[int]:
        """First tokens, node by node, from each prompt node's logits. → request ids finished."""
        finished = []
        for node, of_node in groupby(starts, key=attrgetter("node_id")):
            sequences = [self.sequences[start.request_id] for start in of_node]
            finished += self._draw(sequences, self.node_logits[node].expand(len(sequences), -1))
        return finished

    def _draw(self, sequences: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """One token per sequence from its logits row [S, V]; completes those that end → ids."""
        if not sequences:
            return []
        finished = []
        keep = [i for i, s in enumerate(sequences) if s.request.max_new_tokens > 0 and s.error is None]
        if len(keep) < len(sequences):  # scoring, or a row that cannot run: done at its start
            with self.lock:
                for sequence in (s for s in sequences if s.request.max_new_tokens <= 0 or s.error is not None):
                    sequence.finish = RowFinish(0, "error" if sequence.error is not None else "scored")
                    del self.sequences[sequence.request_id]
                    self.done.append(self._completion(sequence))
                    finished.append(sequence.request_id)
            if not keep:
                return finished
            sequences, logits = [sequences[i] for i in keep], logits[keep]
        tokens = _next_tokens(sequences, logits, self.engine.constraints)
        with self.lock:
            for sequence, token in zip(sequences, tokens, strict=True):
                if self._append(sequence, token):
                    del self.sequences[sequence.request_id]
                    self.done.append(self._completion(sequence))
                    finished.append(sequence.request_id)
        return finished

    def _append(self, sequence: _Sequence, token: int) -> bool:
        """Adds the token; whether a stop rule or the length limit ends the sequence now."""
        sequence.generated.append(token)
        text = self.engine.decode(sequence.generated) if sequence.rule.stop else ""
        sequence.finish = row_finish(sequence.rule, len(sequence.generated), token, text)
        return sequence.finish is not None

    def _completion(self, sequence: _Sequence) -> Completion:
        request = sequence.request
        if sequence.error is not None:
            return error_completion(
                request.row_index, "invalid_constraint", sequence.error, request.num_prompt_tokens, request.sample_index
            )
        token_ids = tuple(sequence.generated[: sequence.finish.num_tokens])
        if sequence.finish.reason == "scored":  # its output is the continuation it scored
            token_ids = request.continuation
        prompt = {}
        if request.logprobs_from is not None:
            prompt = prompt_results(request, self.prompt_scores.records(sequence.request_id, request), self.engine.token_texts)
        return Completion(
            row_index=sequence.request.row_index,
            token_ids=token_ids,
            text=cut_at_stop(self.engine.decode(list(token_ids)), sequence.rule.stop),
            finish_reason=sequence.finish.reason,
            num_prompt_tokens=sequence.request.num_prompt_tokens,
            num_cached_prompt_tokens=sequence.num_cached_tokens,
            sample_index=sequence.request.sample_index,
            logprobs=None if sequence.logprobs is None else self.engine.token_texts.named(sequence.logprobs[: len(token_ids)]),
            constrained=sequence.matcher is not None,
            **prompt,
        )


def _next_tokens(sequences: list[_Sequence], logits: torch.Tensor, constraints: LazyConstraints) -> list[int]:
    """One token per row of logits [S, V]: argmax, or a draw from the sequence's generator,
    after the row's penalties and grammar mask; the logprobs of those that asked, from the
    raw logits."""
    raw = logits
    penalized = [i for i, s in enumerate(sequences) if needs_penalize(s.request.sampling, len(s.generated))]
    constrained = [i for i, s in enumerate(sequences) if s.matcher is not None]
    if penalized or constrained:
        logits = logits.clone()  # not the shared node logits `_start` hands in
    if penalized:
        chosen = [sequences[i] for i in penalized]
        rows = logits[penalized]  # [P, V], a copy
        penalize(
            rows,
            [s.request.sampling for s in chosen],
            [s.prompt_ids for s in chosen],
            [s.generated for s in chosen],
            [sorted(s.rule.stop_token_ids) for s in chosen],
        )
        logits[penalized] = rows
    if constrained:
        rows = logits[constrained]
        matchers = [sequences[i].matcher for i in constrained]
        constraints.get().mask(rows, matchers)
        dead = torch.isinf(rows).all(dim=-1).nonzero()[:, 0].tolist()
        if dead:  # min_tokens masked every token the grammar allows (it is complete): the grammar wins
            again = raw[[constrained[i] for i in dead]].clone()
            constraints.get().mask(again, [matchers[i] for i in dead])
            rows[dead] = again
        logits[constrained] = rows
    tokens = logits.argmax(dim=-1)  # [S] greedy; the first maximum, as transformers picks
    sampled = [i for i, s in enumerate(sequences) if s.seed is not None]
    if sampled:
        params = [sequences[i].request.sampling for i in sampled]
        tokens[sampled] = draw_tokens(
            logits[sampled], params, uniforms([sequences[i].seed for i in sampled], [len(sequences[i].generated) for i in sampled])
        )
    picked = tokens.tolist()
    for i in constrained:
        sequences[i].matcher.accept(picked[i])
    asked = [i for i, s in enumerate(sequences) if s.logprobs is not None]
    if asked:
        found = token_logprobs(
            raw[asked], [picked[i] for i in asked], [sequences[i].request.sampling.logprobs for i in asked]
        )
        for i, logprob in zip(asked, found, strict=True):
            sequences[i].logprobs.append(logprob)
    return picked


def _forward(
    model: CausalLM, store: KVStore, step: Step, token_ids: list[int], batch_invariant: bool
) -> torch.Tensor:
    """Logits [len(step.logits_rows), V] fp32 of one packed step; its rows' KV lands in `store`."""
    segments = [
        SegmentKV(s.segment_id, s.parent_id, s.key_start, s.num_keys) for s in step.segments
    ]
    runs = [QueryRun(row.segment_id, i, row.offset, 1) for i, row in enumerate(step.decode_rows)]
    runs += [QueryRun(c.node_id, c.first_row, c.offset, c.num_tokens) for c in step.prefill_chunks]
    scale = model.config.attention_scale
    plan = plan_attention(segments, runs)
    attention = tree.for_step(store, plan, scale=scale, batch_invariant=batch_invariant)
    device = model.device
    with torch.inference_mode():
        return model(
            torch.tensor(token_ids, dtype=torch.long, device=device),  # [T]
            attention.positions,
            attention,
            logits_rows=torch.tensor(step.logits_rows, dtype=torch.long),  # the model finds distinct rows on the host
            batch_invariant=batch_invariant,
        )
