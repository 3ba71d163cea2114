"""The plan: what executors and the Dask backend consume, as plain data.

In: the job's prompts (`tokens`, `offsets`) and `max_tokens`. Out: a `Plan`, built by
`build_plan`: validate -> tree -> statistics -> groups and order -> shards.

A `Plan` holds ids, token spans and counts only (no tokens, no tree objects): node `x`'s
segment is `tokens[node_token_start[x] : + node_num_tokens[x]]` of the job's token array,
its parent is `node_parent[x]` (the root, node 0, is its own parent), and its KV lives from
group `node_first_group[x]` to `node_last_group[x]`. Groups are contiguous runs of
`request_order`, shards contiguous runs of groups. It round-trips through `to_dict` /
`from_dict` (plain lists, JSON-safe) and `explain()` prints a readable summary.

Executing a shard: run its groups in order; before group g, compute the KV of
`group(g).new_node_ids` (parents first); after it, free the nodes whose last group is g or
that the shard will not use again (`min(node_last_group, last group of the shard)`). A node
used on both sides of a shard cut is computed by both workers (`shard_duplicated_tokens`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import numpy as np

from prefixbatch.prefix_tree.groups import Schedule, group_node_index, schedule_groups
from prefixbatch.prefix_tree.inputs import PlanInputError, check_prompts
from prefixbatch.prefix_tree.lexsort import DEFAULT_WINDOW
from prefixbatch.prefix_tree.policies import DEFAULT_POLICY, POLICIES, OrderPolicy
from prefixbatch.prefix_tree.shards import Shards, cut_shards
from prefixbatch.prefix_tree.stats import TreeStats, tree_stats
from prefixbatch.prefix_tree.tree import PrefixTree, build_tree

PLAN_FORMAT = "prefixbatch.plan/1"


@dataclass(frozen=True)
class Group:
    """One group: requests that run together while their shared segments' KV is held."""

    group_id: int
    shard_id: int
    request_ids: tuple[int, ...]  # in execution order
    node_ids: tuple[int, ...]  # every node on the members' paths, parents first
    new_node_ids: tuple[int, ...]  # nodes whose KV this group computes (first use in its shard)
    num_kv_tokens: int  # peak KV: node tokens (pinned included) + members' max_tokens
    num_prefill_tokens: int  # prompt tokens computed here
    num_decode_tokens: int
    is_over_budget: bool  # a single request that alone exceeds the KV budget


@dataclass(frozen=True)
class Shard:
    """A run of consecutive groups for one worker."""

    shard_id: int
    group_ids: range
    num_requests: int
    num_prefill_tokens: int  # duplicated path included
    num_decode_tokens: int
    num_duplicated_tokens: int  # path tokens also prefilled by the previous shard

    @property
    def cost(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


@dataclass(frozen=True, eq=False)
class Plan:
    # The settings that shaped it, recorded so every reader runs and reports the same plan.
    kv_budget_tokens: int  # KV tokens an executor may hold at once
    group_budget_tokens: int  # KV tokens one group may take (the rest: the next group's prefill)
    prefix_sharing: bool  # false: planned as if no two prompts shared a prefix
    policy: str  # the sibling order (`policies.POLICIES`)
    # Requests, by position in execution order (except request_node: by request id).
    request_order: np.ndarray  # [n] request ids
    request_num_cached_tokens: (
        np.ndarray
    )  # [n] prompt tokens whose KV exists when it runs (0 at shard starts)
    request_node: np.ndarray  # [n] node each request ends at, by request id
    # Groups.
    group_starts: np.ndarray  # [G+1] offsets into request_order
    group_kv_tokens: np.ndarray  # [G]
    group_prefill_tokens: np.ndarray  # [G] prompt tokens computed in the group (shard cut included)
    group_decode_tokens: np.ndarray  # [G]
    group_over_budget: np.ndarray  # [G] bool
    group_node_starts: np.ndarray  # [G+1] offsets into group_node_ids
    group_node_ids: np.ndarray  # nodes each group needs, parents first
    # Nodes (tree segments).
    node_parent: np.ndarray  # [m]
    node_token_start: np.ndarray  # [m] where the segment's tokens are in the job's tokens
    node_num_tokens: np.ndarray  # [m]
    node_depth: np.ndarray  # [m] prompt tokens above the segment
    node_first_group: np.ndarray  # [m] KV computed in this group...
    node_last_group: np.ndarray  # [m] ...and freed after this one (each shard: clipped to it)
    # Shards.
    shard_group_starts: np.ndarray  # [K+1] offsets into groups
    shard_prefill_tokens: np.ndarray  # [K]
    shard_decode_tokens: np.ndarray  # [K]
    shard_duplicated_tokens: np.ndarray  # [K]
    stats: TreeStats

    @property
    def num_requests(self) -> int:
        return len(self.request_order)

    @property
    def num_groups(self) -> int:
        return len(self.group_starts) - 1

    @property
    def num_shards(self) -> int:
        return len(self.shard_group_starts) - 1

    @property
    def num_nodes(self) -> int:
        return len(self.node_parent)

    def group(self, group_id: int) -> Group:
        lo, hi = self.group_starts[group_id], self.group_starts[group_id + 1]
        nodes = self.group_node_ids[
            self.group_node_starts[group_id] : self.group_node_starts[group_id + 1]
        ]
        shard_id = int(np.searchsorted(self.shard_group_starts, group_id, side="right") - 1)
        first_in_shard = np.maximum(self.node_first_group[nodes], self.shard_group_starts[shard_id])
        return Group(
            group_id=group_id,
            shard_id=shard_id,
            request_ids=tuple(self.request_order[lo:hi].tolist()),
            node_ids=tuple(nodes.tolist()),
            new_node_ids=tuple(nodes[first_in_shard == group_id].tolist()),
            num_kv_tokens=int(self.group_kv_tokens[group_id]),
            num_prefill_tokens=int(self.group_prefill_tokens[group_id]),
            num_decode_tokens=int(self.group_decode_tokens[group_id]),
            is_over_budget=bool(self.group_over_budget[group_id]),
        )

    def groups(self) -> Iterator[Group]:
        return (self.group(g) for g in range(self.num_groups))

    def shard(self, shard_id: int) -> Shard:
        first, end = (
            int(self.shard_group_starts[shard_id]),
            int(self.shard_group_starts[shard_id + 1]),
        )
        return Shard(
            shard_id=shard_id,
            group_ids=range(first, end),
            num_requests=int(self.group_starts[end] - self.group_starts[first]),
            num_prefill_tokens=int(self.shard_prefill_tokens[shard_id]),
            num_decode_tokens=int(self.shard_decode_tokens[shard_id]),
            num_duplicated_tokens=int(self.shard_duplicated_tokens[shard_id]),
        )

    def shards(self) -> Iterator[Shard]:
        return (self.shard(k) for k in range(self.num_shards))

    def to_dict(self) -> dict:
        """Plain lists and numbers only (JSON-safe)."""
        out: dict = {"format": PLAN_FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                out[f.name] = value.tolist()
            elif isinstance(value, TreeStats):
                out[f.name] = value.to_dict()
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if data.get("format") != PLAN_FORMAT:
            raise PlanInputError(
                f"plan `format` must be {PLAN_FORMAT!r}, got {data.get('format')!r}"
            )
        values = {}
        for f in fields(cls):
            raw = data[f.name]
            if f.name == "stats":
                values[f.name] = TreeStats.from_dict(raw)
            elif f.name in ("kv_budget_tokens", "group_budget_tokens"):
                values[f.name] = int(raw)
            elif f.name in ("prefix_sharing", "policy"):
                values[f.name] = raw
            elif f.name == "group_over_budget":
                values[f.name] = np.asarray(raw, dtype=bool)
            else:
                values[f.name] = np.asarray(raw, dtype=np.int64)
        return cls(**values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            same = np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
            if not same:
                return False
        return True

    __hash__ = None  # mutable-array contents: not hashable

    def digest(self) -> str:
        """A short fingerprint of everything the plan decides (its statistics left out): the
        same digest in `plan --json` and a run's summary means the run executed this plan."""
        decided = {k: v for k, v in self.to_dict().items() if k != "stats"}
        text = json.dumps(decided, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def num_prefill_tokens(self) -> int:
        """Prompt tokens the executors compute, tokens duplicated at shard cuts included."""
        return int(self.shard_prefill_tokens.sum())

    @property
    def num_decode_tokens(self) -> int:
        """Tokens the plan expects to decode (the sum of max_tokens)."""
        return int(self.group_decode_tokens.sum())

    @property
    def peak_kv_tokens(self) -> int:
        """The largest group's KV: what the plan expects an executor to hold at once at most."""
        return int(self.group_kv_tokens.max(initial=0))

    def explain(self) -> str:
        from prefixbatch.prefix_tree.explain import explain_plan

        return explain_plan(self)


def build_plan(
    tokens,
    offsets,
    max_tokens,
    *,
    kv_budget_tokens: int,
    group_budget_tokens: int | None = None,
    num_shards: int = 1,
    policy: str | OrderPolicy = DEFAULT_POLICY,
    top_k: int = 10,
    decode: Callable[[np.ndarray], str] | None = None,
    window: int = DEFAULT_WINDOW,
    share: bool = True,
    keep_together: np.ndarray | None = None,
) -> Plan:
    """Plan a job: request i is tokens[offsets[i]:offsets[i+1]] and decodes ~max_tokens[i].

    `kv_budget_tokens` is what an executor holds at once; each group's KV is bounded by
    `group_budget_tokens` (default: all of it); `num_shards` is the number of workers
    (shards are balanced by estimated work whatever the budget); `policy` names a sibling
    order in `policies.POLICIES` (or is such a function); `decode` (token ids -> text) only
    adds snippets to the statistics' top prefixes. `share=False` plans as if no two prompts
    shared a prefix (`build_tree`): every prompt is prefilled in full (for ablations, and for
    executors that cannot share). `keep_together`: a key per request (its input row); a
    shard never splits requests with the same key.
    """
    prompts = check_prompts(tokens, offsets, max_tokens)
    group_budget = kv_budget_tokens if group_budget_tokens is None else group_budget_tokens
    order_policy = _check_options(kv_budget_tokens, group_budget, num_shards, policy, window)
    tree = build_tree(prompts.tokens, prompts.offsets, window=window, share=share)
    stats = tree_stats(tree, top_k=top_k, decode=decode)
    schedule = schedule_groups(
        tree,
        prompts.max_tokens,
        kv_budget_tokens=group_budget,
        policy=order_policy,
        num_shards=num_shards,
        keep_together=keep_together,
    )
    settings = dict(
        kv_budget_tokens=int(kv_budget_tokens),
        prefix_sharing=share,
        policy=policy if isinstance(policy, str) else policy.__name__,
    )
    return assemble_plan(tree, stats, schedule, cut_shards(schedule, num_shards), **settings)


def assemble_plan(
    tree: PrefixTree,
    stats: TreeStats,
    schedule: Schedule,
    shards: Shards,
    *,
    kv_budget_tokens: int | None = None,
    prefix_sharing: bool = True,
    policy: str = DEFAULT_POLICY,
) -> Plan:
    """The plan from its parts (build_plan's last step; separate so stages can be timed).
    `kv_budget_tokens` defaults to the schedule's group budget."""
    node_starts, node_ids = group_node_index(
        schedule.node_first_group, schedule.node_last_group, schedule.num_groups
    )
    # A worker starts with no KV: its first request recomputes the path shared across the cut.
    cached = schedule.num_cached_tokens.copy()
    first_groups = shards.group_starts[:-1][shards.group_starts[:-1] < schedule.num_groups]
    cached[schedule.group_starts[first_groups]] = 0
    prefill = schedule.group_prefill_tokens.copy()
    prefill[first_groups] += shards.duplicated_tokens[
        shards.group_starts[:-1] < schedule.num_groups
    ]
    return Plan(
        kv_budget_tokens=schedule.kv_budget_tokens if kv_budget_tokens is None else kv_budget_tokens,
        group_budget_tokens=schedule.kv_budget_tokens,
        prefix_sharing=prefix_sharing,
        policy=policy,
        request_order=schedule.request_order,
        request_num_cached_tokens=cached,
        request_node=tree.request_node,
        group_starts=schedule.group_starts,
        group_kv_tokens=schedule.group_kv_tokens,
        group_prefill_tokens=prefill,
        group_decode_tokens=schedule.group_decode_tokens,
        group_over_budget=schedule.group_over_budget,
        group_node_starts=node_starts,
        group_node_ids=node_ids,
        node_parent=tree.node_parent,
        node_token_start=tree.node_token_start,
        node_num_tokens=tree.node_num_tokens,
        node_depth=tree.node_depth,
        node_first_group=schedule.node_first_group,
        node_last_group=schedule.node_last_group,
        shard_group_starts=shards.group_starts,
        shard_prefill_tokens=shards.prefill_tokens,
        shard_decode_tokens=shards.decode_tokens,
        shard_duplicated_tokens=shards.duplicated_tokens,
        stats=stats,
    )


def _check_options(kv_budget_tokens, group_budget_tokens, num_shards, policy, window) -> OrderPolicy:
    for name, value in (
        ("kv_budget_tokens", kv_budget_tokens),
        ("group_budget_tokens", group_budget_tokens),
        ("num_shards", num_shards),
        ("window", window),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise PlanInputError(f"`{name}` must be an integer >= 1, got {value!r}")
    if callable(policy):
        return policy
    if policy not in POLICIES:
        raise PlanInputError(f"`policy` must be one of {sorted(POLICIES)}, got {policy!r}")
    return POLICIES[policy]
