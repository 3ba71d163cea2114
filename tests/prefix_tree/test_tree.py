from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.prefix_tree import ROOT, build_tree
from prefixbatch.prefix_tree.tree import next_smaller, previous_smaller, subtree_sum
from tests.prefix_tree.naive import flat

EXAMPLE_PRETTY = """\
[0] +0 @0 n=6
  [1] +2 @0 n=5 ends=[3]: 1 2
    [2] +1 @2 n=4: 3
      [3] +1 @3 n=2 ends=[0]: 4
        [4] +1 @4 n=1 ends=[5]: 9
      [5] +1 @3 n=2 ends=[1, 2]: 5
  [6] +2 @0 n=1 ends=[4]: 7 8"""

# share=False: one leaf per prompt, in lexicographic order, equal prompts (1, 2) included.
UNSHARED_PRETTY = """\
[0] +0 @0 n=6
  [1] +2 @0 n=1 ends=[3]: 1 2
  [2] +4 @0 n=1 ends=[0]: 1 2 3 4
  [3] +5 @0 n=1 ends=[5]: 1 2 3 4 9
  [4] +4 @0 n=1 ends=[1]: 1 2 3 5
  [5] +4 @0 n=1 ends=[2]: 1 2 3 5
  [6] +2 @0 n=1 ends=[4]: 7 8"""


def test_example_nodes(example):
    tree = build_tree(*example)
    assert tree.pretty() == EXAMPLE_PRETTY
    assert tree.node_parent.tolist() == [0, 0, 1, 2, 3, 2, 0]
    assert tree.node_num_tokens.tolist() == [0, 2, 1, 1, 1, 1, 2]
    assert tree.node_depth.tolist() == [0, 0, 2, 3, 4, 3, 0]
    assert tree.node_level.tolist() == [0, 1, 2, 3, 4, 3, 1]
    assert tree.node_end.tolist() == [7, 6, 6, 5, 5, 6, 7]
    assert tree.request_node.tolist() == [3, 5, 5, 1, 6, 4]
    assert tree.order.tolist() == [3, 0, 5, 1, 2, 4]
    assert tree.children(ROOT).tolist() == [1, 6]
    assert tree.children(2).tolist() == [3, 5]
    assert tree.children(4).tolist() == []
    assert tree.path(5) == [0, 1, 2, 3, 4]
    assert tree.path_tokens(5).tolist() == [1, 2, 3, 4, 9]
    assert tree.requests_at(5).tolist() == [1, 2]
    assert tree.requests_under(2).tolist() == [0, 5, 1, 2]
    assert tree.segment(6).tolist() == [7, 8]


def test_pretty_decodes_and_truncates(example):
    tree = build_tree(*example)

    def letters(ids):
        return "".join(chr(96 + t) for t in ids)

    text = tree.pretty(max_nodes=2, max_tokens=1, decode=letters)
    assert text.splitlines() == [
        "[0] +0 @0 n=6: ''",
        "  [1] +2 @0 n=5 ends=[3]: 'a' …",
        "… 5 more nodes",
    ]


def test_no_requests_and_no_sharing():
    empty = build_tree(*flat([]))
    assert empty.num_nodes == 1 and empty.num_requests == 0
    tree = build_tree(*flat([[3, 4], [1], []]))
    assert tree.node_parent.tolist() == [0, 0, 0]
    assert tree.node_num_tokens.tolist() == [0, 1, 2]
    assert tree.request_node.tolist() == [2, 1, 0]  # the empty prompt ends at the root


def test_unshared_tree_gives_every_prompt_its_own_leaf(example):
    tree = build_tree(*example, share=False)
    assert tree.pretty() == UNSHARED_PRETTY
    assert tree.node_end.tolist() == [7, 2, 3, 4, 5, 6, 7]
    assert tree.path_tokens(5).tolist() == [1, 2, 3, 4, 9]
    empty_too = build_tree(*flat([[3, 4], []]), share=False)
    assert empty_too.request_node.tolist() == [1, 0]  # the empty prompt ends at the root


def test_segments_point_into_tokens(example):
    tree = build_tree(*example)
    for x in range(1, tree.num_nodes):
        request = tree.requests_under(x)[0]
        start = tree.offsets[request] + tree.node_depth[x]
        expected = tree.tokens[start : start + tree.node_num_tokens[x]]
        assert tree.segment(x).tolist() == expected.tolist()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=40))
def test_nearest_smaller_values(middle):
    values = np.array([-1] + middle + [-1], np.int64)
    prev, nxt = previous_smaller(values), next_smaller(values)
    for i in range(len(values)):
        assert prev[i] == max([j for j in range(i) if values[j] < values[i]], default=-1)
        later = [j for j in range(i + 1, len(values)) if values[j] < values[i]]
        assert nxt[i] == min(later, default=len(values))


def test_subtree_sum_is_path_sum(example):
    tree = build_tree(*example)
    value = np.arange(tree.num_nodes) * 10
    sums = subtree_sum(value, tree.node_end)
    for x in range(tree.num_nodes):
        path = tree.path(tree.requests_under(x)[0])
        assert sums[x] == sum(value[y] for y in path[: path.index(x) + 1])
