from __future__ import annotations

import numpy as np
import pytest

from prefixbatch.prefix_tree import POLICIES, build_plan, build_tree, cut_shards, schedule_groups
from prefixbatch.prefix_tree.cuts import balanced_cuts
from tests.prefix_tree.naive import flat

# Two documents, each asked two questions; every request alone is one group (budget).
DOCS = [[1] * 6 + [2], [1] * 6 + [3], [9] * 6 + [2], [9] * 6 + [3]]


def schedule(budget=8, max_tokens=(1, 1, 1, 1)):
    tree = build_tree(*flat(DOCS))
    return schedule_groups(
        tree, np.array(max_tokens), kv_budget_tokens=budget, policy=POLICIES["lexicographic"]
    )


def test_cut_at_the_shallow_boundary():
    s = schedule()
    assert s.group_starts.tolist() == [0, 1, 2, 3, 4]
    shards = cut_shards(s, 2)
    # Between the documents nothing is shared: the cut lands there, duplicating nothing.
    assert shards.group_starts.tolist() == [0, 2, 4]
    assert shards.duplicated_tokens.tolist() == [0, 0]
    assert shards.prefill_tokens.tolist() == [8, 8]
    assert shards.cost.tolist() == [10, 10]


def test_cut_inside_a_subtree_duplicates_its_path():
    # Decode-heavy first request: balance wins over the 6 duplicated document tokens.
    s = schedule(budget=8 + 200, max_tokens=(200, 1, 1, 1))
    assert s.group_starts.tolist() == [0, 1, 4]  # request 0 alone, then the other three
    shards = cut_shards(s, 2)
    assert shards.group_starts.tolist() == [0, 1, 2]
    assert shards.duplicated_tokens.tolist() == [0, 6]
    assert shards.prefill_tokens.tolist() == [7, 6 + 1 + 8]


def test_more_shards_than_groups():
    s = schedule(budget=10**6)
    shards = cut_shards(s, 3)
    assert shards.group_starts.tolist() == [0, 1, 1, 1]
    assert shards.cost.tolist() == [16 + 4, 0, 0]


def test_a_schedule_made_for_k_shards_balances_whatever_the_budget():
    tree = build_tree(*flat(DOCS))
    s = schedule_groups(
        tree,
        np.array([1, 1, 1, 1]),
        kv_budget_tokens=10**6,
        policy=POLICIES["lexicographic"],
        num_shards=2,
    )
    # One group would hold everything; the shard cut between the documents splits it.
    assert s.group_starts.tolist() == [0, 2, 4]
    shards = cut_shards(s, 2)
    assert shards.group_starts.tolist() == [0, 1, 2]
    assert shards.duplicated_tokens.tolist() == [0, 0]
    assert shards.cost.tolist() == [10, 10]


def test_balanced_cuts_trade_imbalance_for_duplicated_tokens():
    cost = np.array([10, 10, 10, 10, 10, 10])
    # Exact balance (cut at 3) duplicates 8 tokens: less than 10 of imbalance at 2 or 4.
    assert balanced_cuts(cost, np.array([0, 8, 0, 8, 8, 8]), 2).tolist() == [0, 3, 6]
    # At 12 duplicated tokens it is not: 2 and 4 score 10 each, the earlier wins.
    assert balanced_cuts(cost, np.array([0, 8, 0, 12, 0, 8]), 2).tolist() == [0, 2, 6]
    assert balanced_cuts(cost, np.zeros(6, np.int64), 3).tolist() == [0, 2, 4, 6]
    assert balanced_cuts(cost[:2], np.zeros(2, np.int64), 4).tolist() == [0, 1, 2, 2, 2]
    assert balanced_cuts(cost[:0], cost[:0], 3).tolist() == [0, 0, 0, 0]


# Like the demo job: a 3-token chat header, 3 system prompts of 40 tokens, 100 questions
# each with a unique suffix, 24 decode tokens each.
HEAD, USER, ASSISTANT = [1, 2, 3], [4, 5], [6, 7]
SYSTEMS = [[100 * (s + 1) + t for t in range(40)] for s in range(3)]
CHATS = [
    HEAD + system + USER + [10_000 + 20 * (100 * s + q) + t for t in range(5 + q % 7)] + ASSISTANT
    for s, system in enumerate(SYSTEMS)
    for q in range(100)
]


@pytest.mark.parametrize(
    ("num_shards", "duplicated", "systems"),
    [
        # Exact balance falls inside the second system prompt's subtree: it is on both
        # shards, and its path (header + system + user marker, 45 tokens) is prefilled twice.
        (2, [0, 45], [[0, 1], [1, 2]]),
        # A cut between system prompts duplicates only the header.
        (3, [0, 3, 3], [[0], [1], [2]]),
        (4, [0, 45, 45, 45], [[0], [0, 1], [1, 2], [2]]),
    ],
)
def test_demo_like_job_with_a_huge_budget(num_shards, duplicated, systems):
    plan = build_plan(
        *flat(CHATS), np.full(len(CHATS), 24), kv_budget_tokens=10**9, num_shards=num_shards
    )
    assert plan.num_groups == num_shards  # one group per shard: the budget splits nothing
    cost = plan.shard_prefill_tokens + plan.shard_decode_tokens
    assert (cost > 0).all()
    assert cost.max() / cost.mean() <= 1.15
    assert plan.shard_duplicated_tokens.tolist() == duplicated
    system_of = np.repeat(np.arange(3), 100)
    on_shard = [
        sorted({int(system_of[r]) for g in s.group_ids for r in plan.group(g).request_ids})
        for s in plan.shards()
    ]
    assert on_shard == systems
    if num_shards <= 3:  # each system prompt is prefilled by at most 2 shards
        assert all(sum(x in shard for shard in on_shard) <= 2 for x in range(3))
