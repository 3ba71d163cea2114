from __future__ import annotations

from prefixbatch.prefix_tree import SharedPrefix, TreeStats, build_tree, tree_stats
from tests.prefix_tree.naive import flat


def test_example_stats(example):
    stats = tree_stats(build_tree(*example), top_k=3)
    assert stats.num_requests == 6
    assert stats.num_prompt_tokens == 21
    assert stats.num_unique_tokens == 8
    assert stats.sharing_ratio == 1 - 8 / 21
    assert stats.num_nodes == 7
    assert stats.num_leaves == 3
    assert stats.prompt_tokens_quantiles == (2, 4, 4, 4, 5)
    # Shared prefix per request: 4, 4, 4, 2, 0 (alone), 4 ([1 2 3 4] is shared with request 0).
    assert stats.shared_tokens_quantiles == (0, 4, 4, 4, 4)
    assert stats.levels_histogram == (0, 2, 0, 3, 1)
    assert stats.top_prefixes == (
        SharedPrefix(
            node_id=1,
            num_tokens=2,
            num_segment_tokens=2,
            num_requests=5,
            num_tokens_saved=8,
            token_span=(12, 14),
        ),
        SharedPrefix(
            node_id=2,
            num_tokens=3,
            num_segment_tokens=1,
            num_requests=4,
            num_tokens_saved=3,
            token_span=(0, 3),
        ),
        SharedPrefix(
            node_id=3,
            num_tokens=4,
            num_segment_tokens=1,
            num_requests=2,
            num_tokens_saved=1,
            token_span=(0, 4),
        ),
    )
    assert TreeStats.from_dict(stats.to_dict()) == stats


def test_top_prefix_text_comes_from_decode(example):
    stats = tree_stats(build_tree(*example), top_k=1, decode=lambda ids: "-".join(map(str, ids)))
    assert stats.top_prefixes[0].text == "1-2"
    assert tree_stats(build_tree(*example), top_k=0).top_prefixes == ()


def test_empty_and_unshared():
    empty = tree_stats(build_tree(*flat([])))
    assert (empty.num_prompt_tokens, empty.sharing_ratio, empty.top_prefixes) == (0, 0.0, ())
    alone = tree_stats(build_tree(*flat([[1, 2], [3]])))
    assert alone.sharing_ratio == 0.0 and alone.top_prefixes == ()
    assert alone.shared_tokens_quantiles == (0, 0, 0, 0, 0)
