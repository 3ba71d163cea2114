"""Sibling-order policies: in which order the depth-first walk visits a node's children.

In: `SubtreeTotals` (per-node totals over each subtree) and the KV budget. Out: sort keys,
primary first, smaller first; ties keep lexicographic order. A policy is a small pure
function, so a new ordering is a new function, not a flag in the scheduler.

Depth-first order itself is not a policy: it is what lets every shared segment live for one
contiguous run of groups. Policies only choose among siblings:

- `heaviest_first` (SGLang): most requests first, then most prompt tokens saved. "Heaviest"
  means number of requests, the quantity SGLang's DFS weight counts.
- `decode_ratio_first` (BatchLLM): largest expected decode/prefill ratio first, so long
  decodes start early and overlap with later groups' prefill.
- `split_heavy_then_decode_ratio` (the default) resolves the two: children too big for one
  group (they will be split into several groups, their path pinned across them) come first,
  heaviest first; children that fit in one group come after, by decode ratio. So groups
  that are siblings, the ones the executor can reorder freely, run decode-heavy first,
  while the big shared prefixes are visited heaviest first, as SGLang does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from prefixbatch.prefix_tree.tree import PrefixTree


@dataclass(frozen=True, eq=False)
class SubtreeTotals:
    """Per node (arrays [m]), totals over the node's subtree."""

    num_requests: np.ndarray  # requests ending in the subtree
    num_prompt_tokens: np.ndarray  # their prompt tokens, counted per request
    num_unique_tokens: np.ndarray  # segment tokens inside the subtree (the path above excluded)
    num_decode_tokens: np.ndarray  # their max_tokens
    num_kv_tokens: np.ndarray  # KV to run the subtree as one group: path + unique + decode

    @property
    def num_tokens_saved(self) -> np.ndarray:
        """Prompt tokens the subtree does not recompute when it runs as one group."""
        path_and_unique = self.num_kv_tokens - self.num_decode_tokens
        return self.num_prompt_tokens - path_and_unique

    @property
    def decode_ratio(self) -> np.ndarray:
        """Expected decode tokens per prompt token the subtree itself computes."""
        return self.num_decode_tokens / np.maximum(self.num_unique_tokens, 1)


OrderPolicy = Callable[[SubtreeTotals, int], tuple[np.ndarray, ...]]


def subtree_totals(tree: PrefixTree, max_tokens: np.ndarray) -> SubtreeTotals:
    """Totals over every subtree, by prefix sums over its node range and request range."""
    seg = np.concatenate([[0], np.cumsum(tree.node_num_tokens)])
    unique = seg[tree.node_end] - seg[np.arange(tree.num_nodes)]
    lengths = np.diff(tree.offsets)[tree.order]
    prompt = np.concatenate([[0], np.cumsum(lengths)])
    decode = np.concatenate([[0], np.cumsum(max_tokens[tree.order])])
    lo, hi = tree.node_lo, tree.node_hi
    return SubtreeTotals(
        num_requests=hi - lo,
        num_prompt_tokens=prompt[hi] - prompt[lo],
        num_unique_tokens=unique,
        num_decode_tokens=decode[hi] - decode[lo],
        num_kv_tokens=tree.node_depth + unique + decode[hi] - decode[lo],
    )


def heaviest_first(totals: SubtreeTotals, kv_budget_tokens: int) -> tuple[np.ndarray, ...]:
    return (-totals.num_requests, -totals.num_tokens_saved)


def decode_ratio_first(totals: SubtreeTotals, kv_budget_tokens: int) -> tuple[np.ndarray, ...]:
    return (-totals.decode_ratio,)


def split_heavy_then_decode_ratio(
    totals: SubtreeTotals, kv_budget_tokens: int
) -> tuple[np.ndarray, ...]:
    fits = totals.num_kv_tokens <= kv_budget_tokens
    heavy, saved = heaviest_first(totals, kv_budget_tokens)
    (ratio,) = decode_ratio_first(totals, kv_budget_tokens)
    # heavy = -num_requests <= -1 < 0, so the first key alone puts every split child first.
    return (np.where(fits, 0, heavy), np.where(fits, 0, saved), np.where(fits, ratio, 0.0))


def lexicographic(totals: SubtreeTotals, kv_budget_tokens: int) -> tuple[np.ndarray, ...]:
    """Keep the tree's own order (by first token); useful as a baseline and in tests."""
    return ()


POLICIES: dict[str, OrderPolicy] = {
    "split_heavy_then_decode_ratio": split_heavy_then_decode_ratio,
    "heaviest_first": heaviest_first,
    "decode_ratio_first": decode_ratio_first,
    "lexicographic": lexicographic,
}
DEFAULT_POLICY = "split_heavy_then_decode_ratio"
