"""Sharing statistics of a prefix tree: what the job costs with and without prefix sharing.

In: a `PrefixTree`. Out: a `TreeStats` of plain numbers (JSON-ready via `to_dict`).

Definitions:
- `num_prompt_tokens`: sum of all prompt lengths (prefill cost without sharing).
- `num_unique_tokens`: sum of all node segment lengths = distinct (prefix, token) pairs =
  the minimum prefill with exact prefix sharing.
- `sharing_ratio = 1 - num_unique_tokens / num_prompt_tokens` (0 for an empty job): the
  fraction of prompt tokens that never need computing. 0.9 means 10x less prefill.
- A request's shared tokens: the length of the longest prefix of its prompt that some
  other request also has (the end depth of the deepest node on its path with 2+ requests).
- Top shared prefixes: nodes with 2+ requests, ranked by the tokens their own segment
  saves, `(num_requests - 1) * segment length`. Each reports its whole prefix (root to the
  node's end) as a span of the job's `tokens`, so a caller holding a tokenizer can decode
  it; this module never sees one (pass `decode` to get text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from prefixbatch.prefix_tree.tree import PrefixTree

QUANTILES = (0.0, 0.5, 0.9, 0.99, 1.0)


@dataclass(frozen=True)
class SharedPrefix:
    """One heavily shared prefix (a tree node and everything above it)."""

    node_id: int
    num_tokens: int  # prefix length from the root to the node's end
    num_segment_tokens: int  # the node's own segment, the part this entry is ranked by
    num_requests: int  # requests whose prompt starts with this prefix
    num_tokens_saved: int  # (num_requests - 1) * num_segment_tokens
    token_span: tuple[int, int]  # [start, stop) in the job's tokens holding the whole prefix
    text: str | None = None  # decode(segment tokens), when a decoder was given


@dataclass(frozen=True)
class TreeStats:
    num_requests: int
    num_prompt_tokens: int  # prefill without sharing
    num_unique_tokens: int  # prefill with exact sharing
    sharing_ratio: float  # 1 - unique / total
    num_nodes: int  # root included
    num_leaves: int  # nodes without children
    prompt_tokens_quantiles: tuple[int, ...]  # request length at QUANTILES
    shared_tokens_quantiles: tuple[int, ...]  # per-request shared prefix length at QUANTILES
    levels_histogram: tuple[int, ...]  # [k] = requests ending at tree level k
    top_prefixes: tuple[SharedPrefix, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TreeStats:
        fields = dict(data)
        fields["top_prefixes"] = tuple(
            SharedPrefix(**{**p, "token_span": tuple(p["token_span"])})
            for p in data["top_prefixes"]
        )
        for name in ("prompt_tokens_quantiles", "shared_tokens_quantiles", "levels_histogram"):
            fields[name] = tuple(data[name])
        return cls(**fields)


def tree_stats(
    tree: PrefixTree,
    *,
    top_k: int = 10,
    decode: Callable[[np.ndarray], str] | None = None,
    snippet_tokens: int = 64,
) -> TreeStats:
    """Statistics of `tree`; `decode` (token ids -> text) adds a snippet to each top prefix."""
    lengths = np.diff(tree.offsets)
    total = int(lengths.sum())
    unique = int(tree.node_num_tokens.sum())
    counts = tree.node_num_requests
    end_node = tree.request_node
    # Deepest node with 2+ requests on each path: the end node itself, or else its parent
    # (every non-root internal node holds 2+ requests), whose end is the leaf's start.
    shared = np.where(
        counts[end_node] >= 2, tree.node_end_depth[end_node], tree.node_depth[end_node]
    )
    has_children = np.zeros(tree.num_nodes, bool)
    has_children[tree.node_parent[1:]] = True
    return TreeStats(
        num_requests=tree.num_requests,
        num_prompt_tokens=total,
        num_unique_tokens=unique,
        sharing_ratio=1.0 - unique / total if total else 0.0,
        num_nodes=tree.num_nodes,
        num_leaves=int((~has_children).sum()),
        prompt_tokens_quantiles=_quantiles(lengths),
        shared_tokens_quantiles=_quantiles(shared),
        levels_histogram=tuple(np.bincount(tree.node_level[end_node]).tolist()),
        top_prefixes=top_shared_prefixes(tree, top_k, decode, snippet_tokens),
    )


def top_shared_prefixes(
    tree: PrefixTree,
    top_k: int,
    decode: Callable[[np.ndarray], str] | None = None,
    snippet_tokens: int = 64,
) -> tuple[SharedPrefix, ...]:
    """The `top_k` nodes with 2+ requests whose own segment saves the most tokens."""
    if top_k <= 0:
        return ()
    saved = (tree.node_num_requests - 1) * tree.node_num_tokens
    candidates = np.flatnonzero((tree.node_num_requests >= 2) & (tree.node_num_tokens > 0))
    if len(candidates) > top_k:
        part = np.argpartition(-saved[candidates], top_k - 1)[:top_k]
        candidates = candidates[part]
    # Most saved first; ties in preorder so the result is deterministic.
    candidates = candidates[np.lexsort((candidates, -saved[candidates]))]
    out = []
    for x in candidates.tolist():
        first_request = tree.order[tree.node_lo[x]]
        start = int(tree.offsets[first_request])
        text = None
        if decode is not None:
            text = decode(tree.segment(x)[:snippet_tokens])
        out.append(
            SharedPrefix(
                node_id=x,
                num_tokens=int(tree.node_end_depth[x]),
                num_segment_tokens=int(tree.node_num_tokens[x]),
                num_requests=int(tree.node_num_requests[x]),
                num_tokens_saved=int(saved[x]),
                token_span=(start, start + int(tree.node_end_depth[x])),
                text=text,
            )
        )
    return tuple(out)


def _quantiles(values: np.ndarray) -> tuple[int, ...]:
    if len(values) == 0:
        return tuple(0 for _ in QUANTILES)
    return tuple(int(v) for v in np.quantile(values, QUANTILES, method="lower"))
