from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.prefix_tree import POLICIES, build_tree, schedule_groups
from prefixbatch.prefix_tree.groups import greedy_group_starts, group_node_index
from tests.prefix_tree.conftest import EXAMPLE_MAX_TOKENS
from tests.prefix_tree.naive import flat


def test_example_schedule(example):
    tree = build_tree(*example)
    s = schedule_groups(tree, EXAMPLE_MAX_TOKENS, kv_budget_tokens=12)
    # Root: [1 2...] (too big for one group) before [7 8]; request 3 ends at node 1 so runs
    # first; under node 2, [..5] (decode/prefill 6/1) before [..4] (5/2).
    assert s.request_order.tolist() == [3, 1, 2, 0, 5, 4]
    assert s.num_cached_tokens.tolist() == [0, 2, 4, 3, 4, 0]
    assert s.group_starts.tolist() == [0, 1, 3, 5, 6]
    assert s.group_kv_tokens.tolist() == [102, 10, 10, 4]
    assert s.group_prefill_tokens.tolist() == [2, 2, 2, 2]
    assert s.group_decode_tokens.tolist() == [100, 6, 5, 2]
    assert s.group_over_budget.tolist() == [True, False, False, False]
    # Node 1 ([1 2]) is pinned from group 0 to group 2; node 6 ([7 8]) lives in group 3 only.
    assert s.node_first_group.tolist() == [0, 0, 1, 2, 2, 1, 3]
    assert s.node_last_group.tolist() == [3, 2, 2, 2, 2, 1, 3]


def test_one_group_when_everything_fits(example):
    s = schedule_groups(
        build_tree(*example),
        EXAMPLE_MAX_TOKENS,
        kv_budget_tokens=10**6,
        policy=POLICIES["lexicographic"],
    )
    assert s.request_order.tolist() == [3, 0, 5, 1, 2, 4]
    assert s.group_starts.tolist() == [0, 6]
    assert s.group_kv_tokens.tolist() == [8 + 113]


POLICY_PROMPTS = [[5, 1], [5, 2], [5, 3], [4, 9]]
POLICY_MAX_TOKENS = np.array([1, 5, 3, 5])


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("lexicographic", [3, 0, 1, 2]),
        ("heaviest_first", [0, 1, 2, 3]),  # [5 ...] holds 3 requests
        ("decode_ratio_first", [3, 1, 2, 0]),  # [4 9]: 5/2 > [5 ...]: 9/4; then 5 > 3 > 1
        # [5 ...] needs 4 + 9 = 13 > 12 tokens: split, so it goes first (heaviest); its leaves
        # each fit and go by decode ratio.
        ("split_heavy_then_decode_ratio", [1, 2, 0, 3]),
    ],
)
def test_policies(policy, expected):
    tree = build_tree(*flat(POLICY_PROMPTS))
    s = schedule_groups(tree, POLICY_MAX_TOKENS, kv_budget_tokens=12, policy=POLICIES[policy])
    assert s.request_order.tolist() == expected


def naive_greedy(full, extra, budget, breaks=()):
    starts, cost = [0], full[0]
    for q in range(1, len(full)):
        if cost + extra[q] > budget or full[starts[-1]] > budget or q in breaks:
            starts.append(q)
            cost = full[q]
        else:
            cost += extra[q]
    return starts + [len(full)]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=60),
    st.integers(1, 40),
    st.lists(st.integers(1, 59), max_size=4),
)
def test_greedy_matches_loop(pairs, budget, breaks):
    extra = np.array([min(a, b) for a, b in pairs])
    full = np.array([max(a, b) for a, b in pairs])  # a request alone costs at least what it adds
    assert greedy_group_starts(full, extra, budget).tolist() == naive_greedy(full, extra, budget)
    # Shard starts (ascending, as `balanced_cuts` gives them; the end may repeat).
    shard_starts = np.array([0, *sorted(min(b, len(full)) for b in breaks), len(full)])
    assert greedy_group_starts(full, extra, budget, shard_starts).tolist() == naive_greedy(
        full, extra, budget, set(shard_starts.tolist())
    )


def test_group_node_index():
    starts, nodes = group_node_index(np.array([0, 0, 1, 2]), np.array([2, 0, 2, 2]), 3)
    assert starts.tolist() == [0, 2, 4, 7]
    assert nodes.tolist() == [0, 1, 0, 2, 0, 2, 3]


def test_no_requests():
    s = schedule_groups(build_tree(*flat([])), np.zeros(0, np.int64), kv_budget_tokens=5)
    assert s.num_groups == 0 and s.request_order.tolist() == []
