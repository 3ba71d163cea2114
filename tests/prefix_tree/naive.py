"""Slow, obviously-correct references for the planner, and a strategy for planted prompt sets."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from hypothesis import strategies as st


def flat(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of a list of prompts."""
    offsets = np.zeros(len(prompts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in prompts])
    tokens = np.array([t for p in prompts for t in p], np.int32)
    return tokens, offsets


def naive_trie(prompts: list[list[int]]) -> tuple[int, int]:
    """(unique tokens, compressed node count without the root) from a dict-of-dicts per token trie.

    Unique tokens = trie nodes below the root. A compressed node ends at every trie node
    where a prompt ends or the path branches (0 or 2+ children).
    """
    root: dict = {}
    ends: set[int] = set()
    num_nodes = 0
    for prompt in prompts:
        node = root
        for tok in prompt:
            if tok not in node:
                node[tok] = {}
                num_nodes += 1
            node = node[tok]
        ends.add(id(node))
    compressed = 0
    stack = [root]
    while stack:
        node = stack.pop()
        for child in node.values():
            compressed += id(child) in ends or len(child) != 1
            stack.append(child)
    return num_nodes, compressed


def naive_lex(prompts: list[list[int]]) -> tuple[list[int], list[int]]:
    """Lexicographic order (ties by id) and neighbour LCPs, with -1 at both ends (n+1 values)."""
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i], i))
    inner = [common_prefix(prompts[a], prompts[b]) for a, b in pairwise(order)]
    return order, [-1] + inner + [-1] if prompts else [-1]


def common_prefix(a, b) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


@st.composite
def planted_prompts(draw) -> list[list[int]]:
    """System prompts x few-shot blocks x suffixes, plus duplicates and prefixes of others.

    Small vocabularies force partial matches inside any compare window.
    """
    vocab = draw(st.sampled_from([1, 2, 3, 5, 1000]))
    tok = st.integers(0, vocab - 1)
    systems = draw(st.lists(st.lists(tok, max_size=12), min_size=1, max_size=3))
    shots = draw(st.lists(st.lists(tok, max_size=8), min_size=1, max_size=3))
    n = draw(st.integers(1, 16))
    prompts = []
    for _ in range(n):
        system = draw(st.sampled_from(systems))
        shot = draw(st.sampled_from(shots))
        suffix = draw(st.lists(tok, max_size=5))
        prompts.append(system + shot + suffix)
    extras = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["dup", "prefix", "single"]),
                st.integers(0, n - 1),
                st.integers(0, 30),
            ),
            max_size=5,
        )
    )
    for kind, i, cut in extras:
        if kind == "dup":
            prompts.append(list(prompts[i]))
        elif kind == "prefix":
            prompts.append(prompts[i][: min(cut, len(prompts[i]))])
        else:
            prompts.append([cut % vocab])
    order = draw(st.permutations(range(len(prompts))))
    return [prompts[i] for i in order]
