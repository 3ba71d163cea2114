"""Property tests: random planted prompt sets against slow references."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.prefix_tree import Plan, build_plan, build_tree, cut_shards, schedule_groups
from prefixbatch.prefix_tree.cuts import balanced_cuts
from prefixbatch.prefix_tree.lexsort import sort_prompts
from tests.prefix_tree.naive import flat, naive_lex, naive_trie, planted_prompts

WINDOWS = st.sampled_from([1, 2, 3, 5, 64])
BUDGETS = st.one_of(st.integers(1, 60), st.just(10**9))  # 10**9: one group would hold all


@settings(max_examples=300, deadline=None)
@given(planted_prompts(), WINDOWS)
def test_lexsort_matches_sorted(prompts, window):
    tokens, offsets = flat(prompts)
    lex = sort_prompts(tokens, offsets, window=window)
    order, lcp = naive_lex(prompts)
    assert [prompts[i] for i in lex.order] == [prompts[i] for i in order]
    assert lex.lcp.tolist() == lcp


@settings(max_examples=300, deadline=None)
@given(planted_prompts(), WINDOWS)
def test_tree_rebuilds_prompts_and_matches_naive_trie(prompts, window):
    tokens, offsets = flat(prompts)
    tree = build_tree(tokens, offsets, window=window)
    for i, prompt in enumerate(prompts):
        assert tree.path_tokens(i).tolist() == prompt
    unique, compressed = naive_trie(prompts)
    assert int(tree.node_num_tokens.sum()) == unique
    assert tree.num_nodes - 1 == compressed
    assert (tree.node_num_tokens[1:] > 0).all()
    assert (tree.node_parent[1:] < np.arange(1, tree.num_nodes)).all()  # preorder
    paths = [set(tree.path(i)) for i in range(len(prompts))]
    for x in range(tree.num_nodes):
        under = {i for i, p in enumerate(paths) if x in p}
        assert set(tree.requests_under(x).tolist()) == under
        assert set(tree.requests_at(x).tolist()) == {i for i in under if tree.path(i)[-1] == x}
        assert tree.node_level[x] == tree.path(tree.requests_under(x)[0]).index(x)


@settings(max_examples=200, deadline=None)
@given(planted_prompts(), WINDOWS)
def test_unshared_tree_keeps_the_tree_invariants(prompts, window):
    tokens, offsets = flat(prompts)
    tree = build_tree(tokens, offsets, window=window, share=False)
    nonempty = [i for i, p in enumerate(prompts) if p]
    assert tree.num_nodes == 1 + len(nonempty)
    assert int(tree.node_num_tokens.sum()) == sum(len(p) for p in prompts)  # nothing shared
    assert tree.order.tolist() == build_tree(tokens, offsets, window=window).order.tolist()
    for i, prompt in enumerate(prompts):
        assert tree.path_tokens(i).tolist() == prompt
        assert len(tree.path(i)) == (2 if prompt else 1)
    for x in range(tree.num_nodes):
        lo, end = tree.node_lo[x], tree.node_end[x]
        assert set(tree.requests_under(x).tolist()) == {
            i for i in range(len(prompts)) if x == 0 or tree.request_node[i] == x
        }
        assert set(range(x, end)) == {y for y in range(tree.num_nodes) if x == 0 or y == x}
        assert lo <= tree.node_hi[x]


@settings(max_examples=200, deadline=None)
@given(planted_prompts(), st.data())
def test_plan_invariants(prompts, data):
    n = len(prompts)
    max_tokens = np.array(data.draw(st.lists(st.integers(0, 12), min_size=n, max_size=n)))
    budget = data.draw(BUDGETS)
    num_shards = data.draw(st.integers(1, 4))
    share = data.draw(st.booleans())
    policy = data.draw(
        st.sampled_from(
            [
                "split_heavy_then_decode_ratio",
                "heaviest_first",
                "decode_ratio_first",
                "lexicographic",
            ]
        )
    )
    tokens, offsets = flat(prompts)
    plan = build_plan(
        tokens,
        offsets,
        max_tokens,
        kv_budget_tokens=budget,
        num_shards=num_shards,
        policy=policy,
        window=data.draw(WINDOWS),
        share=share,
    )
    tree = build_tree(tokens, offsets, share=share)
    paths = [tree.path(i) for i in range(n)]  # same node numbering as the plan's
    seg = tree.node_num_tokens
    groups = list(plan.groups())

    # Every request in exactly one group and one shard.
    members = [r for g in groups for r in g.request_ids]
    assert sorted(members) == list(range(n))
    shard_members = [
        r for s in plan.shards() for g in s.group_ids for r in plan.group(g).request_ids
    ]
    assert sorted(shard_members) == list(range(n))
    assert plan.num_shards == num_shards

    # Budgets: each group fits, or is one request over budget; its KV is exact.
    for g in groups:
        nodes = sorted({x for r in g.request_ids for x in paths[r]})
        assert list(g.node_ids) == nodes
        kv = int(seg[nodes].sum()) + int(max_tokens[list(g.request_ids)].sum())
        assert g.num_kv_tokens == kv
        assert kv <= budget or (len(g.request_ids) == 1 and g.is_over_budget)
        assert g.is_over_budget == (kv > budget)
    # Greedy: a group ends where the next request would not have fitted or a shard starts.
    for g, nxt in pairwise(groups):
        if nxt.shard_id != g.shard_id:
            continue
        grown_ids = list(g.request_ids + nxt.request_ids[:1])
        nodes = {x for r in grown_ids for x in paths[r]}
        grown = int(seg[sorted(nodes)].sum()) + int(max_tokens[grown_ids].sum())
        assert grown > budget

    # Depth-first: every subtree's requests are contiguous in execution order.
    position = np.empty(n, np.int64)
    position[plan.request_order] = np.arange(n)
    for x in range(tree.num_nodes):
        pos = np.sort(position[tree.requests_under(x)])
        assert pos[-1] - pos[0] == len(pos) - 1

    # KV lifetimes: the groups using a node are exactly [first, last].
    for x in range(tree.num_nodes):
        users = [g.group_id for g in groups if x in g.node_ids]
        if users:
            assert users == list(range(plan.node_first_group[x], plan.node_last_group[x] + 1))

    # Costs: within a shard nothing is prefilled twice; cuts add exactly the shared path.
    for s in plan.shards():
        nodes = {x for g in s.group_ids for x in plan.group(g).node_ids}
        unique = int(seg[sorted(nodes)].sum())
        assert s.num_prefill_tokens == unique
        assert s.num_prefill_tokens == sum(plan.group(g).num_prefill_tokens for g in s.group_ids)
        new = [x for g in s.group_ids for x in plan.group(g).new_node_ids]
        assert sorted(new) == sorted(nodes)
    lengths = np.diff(offsets)[plan.request_order]
    assert int((lengths - plan.request_num_cached_tokens).sum()) == int(
        plan.shard_prefill_tokens.sum()
    )
    assert int(plan.shard_prefill_tokens.sum()) == plan.stats.num_unique_tokens + int(
        plan.shard_duplicated_tokens.sum()
    )

    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.explain()


@settings(max_examples=100, deadline=None)
@given(planted_prompts(), st.data())
def test_shards_fall_on_the_schedule_cuts(prompts, data):
    """A schedule made for K shards has a group start at each balanced request-level cut,
    and `cut_shards` finds exactly those cuts."""
    n = len(prompts)
    max_tokens = np.array(data.draw(st.lists(st.integers(0, 12), min_size=n, max_size=n)))
    budget = data.draw(BUDGETS)
    num_shards = data.draw(st.integers(1, 5))
    tree = build_tree(*flat(prompts))
    s = schedule_groups(tree, max_tokens, kv_budget_tokens=budget, num_shards=num_shards)
    lengths = np.diff(tree.offsets)[s.request_order]
    work = lengths - s.num_cached_tokens + max_tokens[s.request_order]
    cuts = balanced_cuts(work, s.num_cached_tokens, num_shards)
    shards = cut_shards(s, num_shards)
    assert s.group_starts[shards.group_starts].tolist() == cuts.tolist()
    if budget == 10**9:  # the budget splits nothing: one group per non-empty shard
        assert s.group_starts.tolist() == sorted(set(cuts.tolist()))
