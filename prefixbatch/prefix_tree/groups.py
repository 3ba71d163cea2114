"""Groups and their order: which requests run together, and when each segment's KV lives.

In: a `PrefixTree`, per-request `max_tokens`, a KV budget in tokens, a sibling-order policy
(`policies.py`) and the number of shards K. Out: a `Schedule`.

1. Order. Requests are laid out depth-first: a node's own requests, then each child's
   subtree in the policy's sibling order. Every subtree is then one contiguous run of
   `request_order`. The shared tokens between neighbours (`num_cached_tokens`, the LCP of
   each request with the one before it) come from the tree: the first request of a subtree
   shares exactly the depth where that subtree's top node starts.
2. Cost. A run of requests needs KV for the union of their root-to-leaf paths (each shared
   segment once) plus every member's `max_tokens`. In depth-first order that union grows
   by `len - cached` per added request, so the cost of any run is a prefix-sum difference.
   This is the group's peak KV, pinned segments included.
3. Shards. With K > 1 the order is first cut into K runs balanced by work (`len - cached +
   max_tokens` per request), preferring shallow subtree boundaries (`cuts.py`). Cutting
   before groups is what balances shards when the budget allows huge groups (one group
   could otherwise hold the whole job), and lets a cut sit exactly between two subtrees.
4. Groups. Each shard's run is cut greedily: each group takes as many following requests
   as fit the budget (fewest groups for this order: the cost only grows as a run extends),
   and never crosses a shard cut (at most K-1 groups more than one shard would need). A
   request that alone exceeds the budget is its own group, marked over budget. A subtree
   too big for one group is thereby split into pieces that each include the shared path.
5. Lifetimes. A node is needed by the groups that hold some request below it: since its
   requests are contiguous, that is the range [node_first_group, node_last_group]. Its KV is
   computed in the first and freed after the last; nothing is computed twice within a shard.

Invariants (tested): every request in exactly one group; groups are contiguous runs of a
depth-first order; each group's KV <= budget unless it is one over-budget request; a group
ends only where the next request would not fit or a shard starts; the sum of groups'
prefill tokens equals the tree's unique tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefixbatch.prefix_tree.cuts import balanced_cuts
from prefixbatch.prefix_tree.policies import (
    OrderPolicy,
    SubtreeTotals,
    split_heavy_then_decode_ratio,
    subtree_totals,
)
from prefixbatch.prefix_tree.tree import PrefixTree, subtree_sum


@dataclass(frozen=True, eq=False)
class Schedule:
    """Requests in execution order, cut into groups, and each node's KV lifetime."""

    kv_budget_tokens: int
    request_order: np.ndarray  # [n] request ids, depth-first
    num_cached_tokens: np.ndarray  # [n] per position: LCP with the previous request
    group_starts: np.ndarray  # [G+1] group g is request_order[group_starts[g]:group_starts[g+1]]
    group_kv_tokens: np.ndarray  # [G] peak KV: its nodes' tokens (pinned ones too) + max_tokens
    group_prefill_tokens: np.ndarray  # [G] prompt tokens first computed in this group
    group_decode_tokens: np.ndarray  # [G] sum of members' max_tokens
    group_over_budget: np.ndarray  # [G] bool, a single request that alone exceeds the budget
    node_first_group: np.ndarray  # [m] first group that needs the node (its KV is computed there)
    node_last_group: np.ndarray  # [m] last group that needs it (its KV is freed after)
    # [K+1] the balanced shard cuts it was made for, in groups (`cut_shards` keeps them)
    shard_group_starts: np.ndarray | None = None

    @property
    def num_groups(self) -> int:
        return len(self.group_starts) - 1


def schedule_groups(
    tree: PrefixTree,
    max_tokens: np.ndarray,
    *,
    kv_budget_tokens: int,
    policy: OrderPolicy = split_heavy_then_decode_ratio,
    num_shards: int = 1,
    keep_together: np.ndarray | None = None,
) -> Schedule:
    """Depth-first order under `policy`, greedy groups under the budget, node lifetimes.

    `num_shards`: the K the schedule will be cut into (`cut_shards(schedule, K)`); groups
    then also start at the K balanced shard cuts. `keep_together` (a key per request id,
    e.g. its input row): a shard never starts between two requests with the same key.
    """
    totals = subtree_totals(tree, max_tokens)
    if tree.num_requests == 0:
        return _empty_schedule(kv_budget_tokens, tree.num_nodes)
    node_start = depth_first_starts(tree, policy(totals, kv_budget_tokens), totals)
    request_order, cached = _lay_out_requests(tree, node_start)
    lengths = np.diff(tree.offsets)[request_order]
    decode = max_tokens[request_order]
    work = lengths - cached + decode
    allowed = None
    if keep_together is not None:
        keys = np.asarray(keep_together)[request_order]
        allowed = np.r_[True, keys[1:] != keys[:-1]]
    shard_starts = balanced_cuts(work, cached, num_shards, allowed)
    starts = greedy_group_starts(lengths + decode, work, kv_budget_tokens, shard_starts)
    node_last = node_start + totals.num_requests - 1
    return Schedule(
        kv_budget_tokens=kv_budget_tokens,
        request_order=request_order,
        num_cached_tokens=cached,
        group_starts=starts,
        **_group_costs(starts, lengths, cached, decode, kv_budget_tokens),
        node_first_group=_group_of(starts, node_start),
        node_last_group=_group_of(starts, node_last),
        shard_group_starts=np.searchsorted(starts, shard_starts),
    )


def depth_first_starts(
    tree: PrefixTree, keys: tuple[np.ndarray, ...], totals: SubtreeTotals
) -> np.ndarray:
    """[m] first position of each node's subtree in the depth-first request order.

    A node's subtree starts after its parent's own requests and its earlier siblings'
    subtrees; summing those offsets down the root-to-node path gives the start.
    """
    m = tree.num_nodes
    if m == 1:
        return np.zeros(1, np.int64)
    kids = np.arange(1, m)
    parent = tree.node_parent[kids]
    sib = kids[np.lexsort(tuple(k[kids] for k in reversed(keys)) + (parent,))]
    sizes = totals.num_requests[sib]
    before = np.cumsum(sizes) - sizes  # requests before each child, over all parents
    first_of_parent = np.flatnonzero(
        np.r_[True, tree.node_parent[sib][1:] != tree.node_parent[sib][:-1]]
    )
    seg_base = np.repeat(before[first_of_parent], np.diff(np.r_[first_of_parent, len(sib)]))
    offset = np.zeros(m, np.int64)
    offset[sib] = tree.node_num_own_requests[tree.node_parent[sib]] + before - seg_base
    return subtree_sum(offset, tree.node_end)


def _lay_out_requests(tree: PrefixTree, node_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Request ids in depth-first order, and each one's LCP with the request before it."""
    n = tree.num_requests
    lex_node = tree.request_node[tree.order]
    # Requests ending at the same node keep their lexicographic (= id) order.
    new_pos = node_start[lex_node] + np.arange(n) - tree.node_lo[lex_node]
    request_order = np.empty(n, np.int64)
    request_order[new_pos] = tree.order
    # By default the previous request ends at the same node: an identical prompt.
    cached = np.diff(tree.offsets)[request_order]
    # Where a subtree starts, the topmost node starting there shares exactly its depth.
    parent_start = node_start[tree.node_parent]
    heads = np.flatnonzero((parent_start != node_start) | (np.arange(tree.num_nodes) == 0))
    cached[node_start[heads]] = tree.node_depth[heads]
    return request_order, cached


def greedy_group_starts(
    full: np.ndarray, extra: np.ndarray, budget: int, breaks: np.ndarray | None = None
) -> np.ndarray:
    """[G+1] starts of the greedy cut of a request run into groups costing <= budget.

    `full[q]`: cost of request q alone; `extra[q]`: what it adds after request q-1. A group
    starting at s takes every following request that keeps full[s] + sum(extra) <= budget,
    up to the next of the ascending positions `breaks` (shard starts), where a group must
    start. The chain of starts 0 -> next[0] -> ... is collected by pointer doubling, so the
    work is O(n log G) in numpy whatever the number of groups G.
    """
    n = len(full)
    if n == 0:
        return np.zeros(1, np.int64)
    cum = np.cumsum(extra)  # non-decreasing: extra >= 0
    limit = budget - full + cum
    nxt = np.maximum(np.searchsorted(cum, limit, side="right"), np.arange(1, n + 1))
    if breaks is not None:
        ends = np.append(breaks, n)
        nxt = np.minimum(nxt, ends[np.searchsorted(ends, np.arange(n), side="right")])
    jump = np.append(nxt, n)  # n is the end: it jumps to itself
    chain = np.zeros(1, np.int64)
    while chain[-1] != n:
        # chain holds next^j(0) for j < 2^k; adding jump^(2^k) of each doubles it.
        chain = np.union1d(chain, jump[chain])
        jump = jump[jump]
    return chain


def _group_costs(starts, lengths, cached, decode, budget) -> dict[str, np.ndarray]:
    """Per group: peak KV (a prefix-sum difference, see step 2), prefill, decode, over budget."""
    first = starts[:-1]
    cum = np.cumsum(lengths - cached + decode)
    kv = lengths[first] + decode[first] + cum[starts[1:] - 1] - cum[first]
    return {
        "group_kv_tokens": kv,
        "group_prefill_tokens": np.add.reduceat(lengths - cached, first),
        "group_decode_tokens": np.add.reduceat(decode, first),
        "group_over_budget": kv > budget,
    }


def _empty_schedule(budget: int, num_nodes: int) -> Schedule:
    none = np.zeros(0, np.int64)
    return Schedule(
        budget,
        none,
        none,
        np.zeros(1, np.int64),
        none,
        none,
        none,
        np.zeros(0, bool),
        np.zeros(num_nodes, np.int64),
        np.full(num_nodes, -1, np.int64),
    )


def _group_of(starts: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Group index holding each request position."""
    return np.searchsorted(starts, pos, side="right") - 1


def group_node_index(
    first_group: np.ndarray, last_group: np.ndarray, num_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (starts [G+1], node ids) of the nodes each group needs, ascending (parents first).

    Node x is needed by groups first_group[x]..last_group[x]; expanding those ranges and
    sorting by group lists every group's nodes.
    """
    span = np.maximum(last_group - first_group + 1, 0)
    node = np.repeat(np.arange(len(first_group)), span)
    ramp = np.arange(len(node)) - np.repeat(np.cumsum(span) - span, span)
    group = first_group[node] + ramp
    order = np.argsort(group, kind="stable")  # nodes were ascending already
    counts = np.bincount(group, minlength=num_groups)
    starts = np.zeros(num_groups + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    return starts, node[order]
