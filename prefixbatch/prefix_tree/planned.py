"""A job's requests with their plan: what every executor is handed, and the one way to make it.

`plan_requests(requests, settings)` is the planning entry point of the whole system: the
job layer calls it once per run (and `prefixbatch plan` calls it the same way), and with
`cluster.plan_on: workers` each partition's worker calls it with the settings the driver
resolved. Executors never plan: they run the `PlannedRequests` they are given.

`PlannedRequests.shard(k)` is shard k's part of a plan, itself a one-shard plan over the
shard's requests (renumbered 0..n-1 in execution order) and the nodes they use (renumbered,
parents first, with a token array of just their segments). Running it on a fresh engine
computes exactly the shard's predicted prefill: the path shared across its first cut again,
every other node once.

in: requests + `PlanSettings` → `PlannedRequests`; out: the plan, per shard if asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from prefixbatch.prefix_tree.plan import Plan, build_plan
from prefixbatch.prefix_tree.policies import DEFAULT_POLICY
from prefixbatch.prefix_tree.requests import prompt_arrays
from prefixbatch.types import Completion, Request

GROUP_SHARE = 0.5  # of the KV budget one group may take: the next group prefills beside it


@dataclass(frozen=True)
class PlanSettings:
    """Every setting that shapes a plan, resolved once per run (`jobs.planning`)."""

    kv_budget_tokens: int  # KV tokens an executor holds at once
    num_shards: int = 1  # workers × shards per worker; 1 without a cluster
    prefix_sharing: bool = True  # false where the executor cannot share, or for ablations
    group_share: float = GROUP_SHARE
    policy: str = DEFAULT_POLICY

    @property
    def group_budget_tokens(self) -> int:
        return max(int(self.kv_budget_tokens * self.group_share), 1)


@dataclass(frozen=True, eq=False)
class PlannedRequests:
    """A plan and what it indexes: plan request i is `requests[i]`, node segments are slices
    of `tokens`."""

    plan: Plan
    requests: tuple[Request, ...]
    tokens: np.ndarray  # [T] int32: `plan.node_token_start` / `node_num_tokens` index it

    @cached_property
    def _max_tokens(self) -> dict[tuple[int, int], int]:
        return {(r.row_index, r.sample_index): r.sampling.max_tokens for r in self.requests}

    def unused_tokens(self, completion: Completion) -> int:
        """Of its request's `max_tokens`, how many a finished completion did not use (it
        stopped early): planned work that is done without being computed."""
        budget = self._max_tokens[completion.row_index, completion.sample_index]
        return max(budget - completion.num_output_tokens, 0)

    def in_order(self) -> Iterator[Request]:
        """The requests in the plan's execution order."""
        return (self.requests[i] for i in self.plan.request_order.tolist())

    def groups(self) -> Iterator[list[Request]]:
        """Each group's requests, groups in the plan's order."""
        plan = self.plan
        for g in range(plan.num_groups):
            ids = plan.request_order[plan.group_starts[g] : plan.group_starts[g + 1]]
            yield [self.requests[i] for i in ids.tolist()]

    def shard(self, shard_id: int) -> PlannedRequests:
        """Shard `shard_id`'s part: a one-shard plan of its groups, requests and nodes."""
        return _shard_part(self, shard_id)

    def subset(self, keep: Callable[[Request], bool]) -> PlannedRequests | None:
        """The kept requests planned again in one shard under this plan's own settings (None
        if none is kept): for running part of a shard on its own."""
        kept = [r for r in self.requests if keep(r)]
        if not kept:
            return None
        plan = self.plan
        return _plan(
            kept,
            kv_budget_tokens=plan.kv_budget_tokens,
            group_budget_tokens=plan.group_budget_tokens,
            num_shards=1,
            policy=plan.policy,
            share=plan.prefix_sharing,
        )

    def shards(self) -> Iterator[PlannedRequests]:
        """Every non-empty shard's part, in shard order."""
        for k in range(self.plan.num_shards):
            if self.plan.shard(k).num_requests:
                yield self.shard(k)


def plan_requests(
    requests: Sequence[Request],
    settings: PlanSettings,
    *,
    decode: Callable[[np.ndarray], str] | None = None,
) -> PlannedRequests:
    """The plan of `requests` under `settings`; a row's samples never split across shards."""
    return _plan(
        requests,
        kv_budget_tokens=settings.kv_budget_tokens,
        group_budget_tokens=settings.group_budget_tokens,
        num_shards=settings.num_shards,
        policy=settings.policy,
        share=settings.prefix_sharing,
        decode=decode,
    )


def _plan(requests: Sequence[Request], **options) -> PlannedRequests:
    tokens, offsets, max_tokens = prompt_arrays(requests)
    rows = np.fromiter((r.row_index for r in requests), np.int64, len(requests))
    plan = build_plan(tokens, offsets, max_tokens, keep_together=rows, **options)
    return PlannedRequests(plan, tuple(requests), tokens)


def _shard_part(work: PlannedRequests, k: int) -> PlannedRequests:
    plan = work.plan
    g0, g1 = int(plan.shard_group_starts[k]), int(plan.shard_group_starts[k + 1])
    p0, p1 = int(plan.group_starts[g0]), int(plan.group_starts[g1])
    request_ids = plan.request_order[p0:p1]
    n0, n1 = int(plan.group_node_starts[g0]), int(plan.group_node_starts[g1])
    nodes = np.union1d([0], plan.group_node_ids[n0:n1])  # ascending: parents before children
    renumber = np.full(plan.num_nodes, -1, np.int64)
    renumber[nodes] = np.arange(len(nodes))
    lengths = plan.node_num_tokens[nodes]
    starts = np.zeros(len(nodes), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    spans = [work.tokens[a : a + n] for a, n in zip(plan.node_token_start[nodes].tolist(), lengths.tolist())]
    tokens = np.concatenate(spans).astype(np.int32) if spans else np.zeros(0, np.int32)
    last_group = max(g1 - 1, g0)
    part = replace(
        plan,
        request_order=np.arange(p1 - p0, dtype=np.int64),
        request_num_cached_tokens=plan.request_num_cached_tokens[p0:p1],
        request_node=renumber[plan.request_node[request_ids]],
        group_starts=plan.group_starts[g0 : g1 + 1] - p0,
        group_kv_tokens=plan.group_kv_tokens[g0:g1],
        group_prefill_tokens=plan.group_prefill_tokens[g0:g1],
        group_decode_tokens=plan.group_decode_tokens[g0:g1],
        group_over_budget=plan.group_over_budget[g0:g1],
        group_node_starts=plan.group_node_starts[g0 : g1 + 1] - n0,
        group_node_ids=renumber[plan.group_node_ids[n0:n1]],
        node_parent=renumber[plan.node_parent[nodes]],
        node_token_start=starts,
        node_num_tokens=lengths,
        node_depth=plan.node_depth[nodes],
        node_first_group=np.clip(plan.node_first_group[nodes], g0, last_group) - g0,
        node_last_group=np.clip(plan.node_last_group[nodes], g0, last_group) - g0,
        shard_group_starts=np.array([0, g1 - g0], np.int64),
        shard_prefill_tokens=plan.shard_prefill_tokens[k : k + 1],
        shard_decode_tokens=plan.shard_decode_tokens[k : k + 1],
        shard_duplicated_tokens=plan.shard_duplicated_tokens[k : k + 1],
    )
    # The statistics stay the whole job's (a shard's own would need its own tree).
    return PlannedRequests(part, tuple(work.requests[i] for i in request_ids.tolist()), tokens)


__all__ = ["GROUP_SHARE", "PlanSettings", "PlannedRequests", "plan_requests"]
