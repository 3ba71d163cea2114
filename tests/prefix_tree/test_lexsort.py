from __future__ import annotations

import numpy as np
import pytest

from prefixbatch.prefix_tree.lexsort import _WindowReader, sort_prompts
from tests.prefix_tree.naive import flat, naive_lex


def test_example_order_and_lcp(example):
    lex = sort_prompts(*example, window=2)
    # [1 2] < [1 2 3 4] < [1 2 3 4 9] < [1 2 3 5] = [1 2 3 5] < [7 8]
    assert lex.order.tolist() == [3, 0, 5, 1, 2, 4]
    assert lex.lcp.tolist() == [-1, 2, 4, 3, 4, 0, -1]


@pytest.mark.parametrize(
    "prompts", [[], [[]], [[], []], [[5]], [[], [1], []], [[2, 1], [2], [2, 1, 0]]]
)
def test_edge_cases(prompts):
    lex = sort_prompts(*flat(prompts), window=3)
    order, lcp = naive_lex(prompts)
    assert [prompts[i] for i in lex.order] == [prompts[i] for i in order]
    assert lex.lcp.tolist() == lcp


def test_large_token_ids_and_long_shared_prefix():
    shared = list(range(2**31 - 300, 2**31 - 1))  # 299 ids near the int32 limit
    prompts = [shared + [7], shared + [2**31 - 1], shared, [0] + shared]
    lex = sort_prompts(*flat(prompts))
    assert lex.order.tolist() == [3, 2, 0, 1]
    assert lex.lcp.tolist() == [-1, 0, 299, 299, -1]


def test_window_reader_reads_past_the_end():
    tokens = np.arange(10, dtype=np.int32)
    reader = _WindowReader(tokens, 4)
    rows = reader.rows(np.array([0, 6, 7, 9]))
    assert rows[:2].tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]
    assert rows[2, :3].tolist() == [7, 8, 9] and rows[3, :1].tolist() == [9]


def test_window_longer_than_all_tokens():
    prompts = [[1, 2], [1, 3], [1]]
    lex = sort_prompts(*flat(prompts), window=64)
    assert lex.order.tolist() == [2, 0, 1]
    assert lex.lcp.tolist() == [-1, 1, 1, -1]


@pytest.mark.parametrize("vocab", [2, 50_000])
def test_long_planted_prompts_take_many_rounds(vocab):
    rng = np.random.default_rng(vocab)
    systems = [rng.integers(0, vocab, int(rng.integers(100, 200))).tolist() for _ in range(4)]
    shots = [rng.integers(0, vocab, int(rng.integers(50, 150))).tolist() for _ in range(3)]
    prompts = [
        systems[rng.integers(4)] + shots[rng.integers(3)] + rng.integers(0, vocab, 5).tolist()
        for _ in range(300)
    ]
    prompts += [p[: len(p) // 2] for p in prompts[:20]] + prompts[:20]
    lex = sort_prompts(*flat(prompts))
    order, lcp = naive_lex(prompts)
    assert [prompts[i] for i in lex.order] == [prompts[i] for i in order]
    assert lex.lcp.tolist() == lcp
