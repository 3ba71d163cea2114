from __future__ import annotations

import numpy as np

from prefixbatch.prefix_tree import POLICIES, build_tree, cut_shards, schedule_groups
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
