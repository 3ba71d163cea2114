"""The global radix tree: every prompt of a job, token-exact, stored as flat arrays.

In: the flat prompt layout (`tokens`, `offsets`, see `inputs.py`). Out: a `PrefixTree`.

Shape of the tree. Node 0 is the root, an empty segment. Every other node is a maximal
segment of tokens shared by all requests below it: a node is either a branching point
(two or more different continuations), the end of some request, or both. A request ends at
exactly one node; several can end at the same node (duplicate prompts, n samples), and a
request can end at an internal node (its prompt is a proper prefix of others). Concatenating
the segments on the root-to-node path rebuilds the prompt exactly.

Storage. Nodes are numbered in preorder with children in lexicographic order of their first
token, so a node's subtree is the node range `[x, node_end[x])` and its requests are the
range `[node_lo[x], node_hi[x])` of the permutation `order` (requests in lexicographic
order; those ending at `x` come first in its range). A segment's tokens are not copied:
`tokens[node_token_start[x] : node_token_start[x] + node_num_tokens[x]]` is one place
where they occur.

Construction (vectorised, no loop per token, request or node):
1. `lexsort.sort_prompts`: lexicographic order and the LCP of neighbours, comparing tokens.
2. Internal nodes are the LCP intervals: for a neighbour boundary with LCP v, the maximal
   run of positions around it whose boundaries all have LCP >= v (found with previous/next
   strictly smaller values via a sparse table). The node ends at depth v; boundaries of
   the same node share (left end, v).
3. A request whose length exceeds the LCP with both neighbours gets a leaf for the rest.
4. A node's parent is the node of whichever of its two enclosing boundaries has the larger
   LCP; nodes are then sorted into preorder by (first position, end depth).

Ablation: `build_tree(..., share=False)` plans as if nothing were shared: the root with one
leaf per prompt holding all of it (`unshared_tree`), so every prompt is prefilled in full
while statistics, groups and lifetimes work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from prefixbatch.prefix_tree.lexsort import DEFAULT_WINDOW, LexOrder, sort_prompts

ROOT = 0  # the root node's id; the root is its own parent


@dataclass(frozen=True, eq=False)
class PrefixTree:
    """A compressed radix tree over a job's prompts (see the module docstring)."""

    tokens: np.ndarray  # [num_tokens] int32, the job's prompts concatenated (not copied)
    offsets: np.ndarray  # [n+1] int64, request i is tokens[offsets[i]:offsets[i+1]]
    order: np.ndarray  # [n] int64, request ids in lexicographic order
    node_parent: np.ndarray  # [m] int64, parent node id; the root is its own parent
    node_token_start: np.ndarray  # [m] int64, where this segment's tokens can be read
    node_num_tokens: np.ndarray  # [m] int64, segment length (0 only for the root)
    node_depth: np.ndarray  # [m] int64, prompt tokens above the segment (where it starts)
    node_level: np.ndarray  # [m] int64, number of ancestors (root 0)
    node_lo: np.ndarray  # [m] int64, the subtree's requests are order[node_lo:node_hi]
    node_hi: np.ndarray  # [m] int64
    node_end: np.ndarray  # [m] int64, the subtree's nodes are [x, node_end[x])
    request_node: np.ndarray  # [n] int64, the node each request ends at

    @property
    def num_requests(self) -> int:
        return len(self.order)

    @property
    def num_nodes(self) -> int:
        return len(self.node_parent)

    @property
    def node_end_depth(self) -> np.ndarray:
        """[m] prompt tokens from the root to the end of each node's segment."""
        return self.node_depth + self.node_num_tokens

    @property
    def node_num_requests(self) -> np.ndarray:
        """[m] requests ending in each node's subtree."""
        return self.node_hi - self.node_lo

    @cached_property
    def node_num_own_requests(self) -> np.ndarray:
        """[m] requests ending exactly at each node."""
        return np.bincount(self.request_node, minlength=self.num_nodes)

    @cached_property
    def _child_index(self) -> tuple[np.ndarray, np.ndarray]:
        # Preorder numbering makes a stable sort by parent keep siblings in lexicographic order.
        non_root = np.arange(1, self.num_nodes)
        kids = non_root[np.argsort(self.node_parent[1:], kind="stable")]
        counts = np.bincount(self.node_parent[1:], minlength=self.num_nodes)
        ptr = np.zeros(self.num_nodes + 1, np.int64)
        np.cumsum(counts, out=ptr[1:])
        return ptr, kids

    def children(self, node: int) -> np.ndarray:
        """Child node ids of `node`, in lexicographic order of their first token."""
        ptr, kids = self._child_index
        return kids[ptr[node] : ptr[node + 1]]

    def segment(self, node: int) -> np.ndarray:
        """The node's own tokens (a view into `tokens`)."""
        start = self.node_token_start[node]
        return self.tokens[start : start + self.node_num_tokens[node]]

    def path(self, request: int) -> list[int]:
        """Node ids from the root to the node where `request` ends."""
        node = int(self.request_node[request])
        nodes = [node]
        while node != ROOT:
            node = int(self.node_parent[node])
            nodes.append(node)
        return nodes[::-1]

    def path_tokens(self, request: int) -> np.ndarray:
        """The request's prompt, rebuilt from the segments on its root-to-leaf path."""
        return np.concatenate([self.segment(x) for x in self.path(request)]).astype(np.int32)

    def requests_at(self, node: int) -> np.ndarray:
        """Request ids ending exactly at `node`."""
        lo = self.node_lo[node]
        return self.order[lo : lo + self.node_num_own_requests[node]]

    def requests_under(self, node: int) -> np.ndarray:
        """Request ids ending anywhere in `node`'s subtree."""
        return self.order[self.node_lo[node] : self.node_hi[node]]

    def pretty(self, *, max_nodes: int = 200, max_tokens: int = 8, decode=None) -> str:
        """An indented preorder listing, for debugging small trees.

        `decode` (token ids -> str) shows text instead of ids.
        """
        lines = []
        for x in range(min(self.num_nodes, max_nodes)):
            seg = self.segment(x)
            if decode is not None:
                shown = repr(decode(seg[:max_tokens]))
            else:
                shown = " ".join(map(str, seg[:max_tokens].tolist()))
            more = " …" if len(seg) > max_tokens else ""
            own = self.node_num_own_requests[x]
            ends = f" ends={self.requests_at(x).tolist()}" if own else ""
            head = (
                f"{'  ' * int(self.node_level[x])}[{x}] +{self.node_num_tokens[x]} "
                f"@{self.node_depth[x]} n={self.node_num_requests[x]}{ends}"
            )
            lines.append(f"{head}: {shown}{more}" if shown else head)
        if self.num_nodes > max_nodes:
            lines.append(f"… {self.num_nodes - max_nodes} more nodes")
        return "\n".join(lines)


def build_tree(
    tokens: np.ndarray, offsets: np.ndarray, *, window: int = DEFAULT_WINDOW, share: bool = True
) -> PrefixTree:
    """The radix tree of the prompts `tokens[offsets[i]:offsets[i+1]]` (inputs already checked).

    `share=False` gives the tree of a job in which no two prompts share anything (for
    ablations): the root with one child per request holding its whole prompt.
    """
    lex = sort_prompts(tokens, offsets, window=window)
    if not share:
        return unshared_tree(tokens, offsets, lex.order)
    return tree_from_lex_order(tokens, offsets, lex)


def unshared_tree(tokens: np.ndarray, offsets: np.ndarray, order: np.ndarray) -> PrefixTree:
    """Root + one leaf per non-empty prompt, leaves in `order` (an empty prompt ends at the root).

    Every invariant of the shared tree holds (preorder, request ranges, rebuilt prompts);
    only maximality is dropped: siblings may start with the same tokens, even be equal.
    """
    lengths = np.diff(offsets)[order]  # [n] by position
    # Lexicographic order puts empty prompts first, so the leaves are the tail of `order`.
    first_leaf = len(order) - int(np.count_nonzero(lengths))
    positions = np.arange(first_leaf, len(order), dtype=np.int64)
    num_nodes = 1 + len(positions)
    request_node = np.zeros(len(order), np.int64)
    request_node[order[positions]] = np.arange(1, num_nodes)
    zero = np.zeros(1, np.int64)
    return PrefixTree(
        tokens=tokens,
        offsets=offsets,
        order=order,
        node_parent=np.zeros(num_nodes, np.int64),
        node_token_start=np.concatenate([zero, offsets[:-1][order[positions]]]),
        node_num_tokens=np.concatenate([zero, lengths[positions]]),
        node_depth=np.zeros(num_nodes, np.int64),
        node_level=np.concatenate([zero, np.ones(len(positions), np.int64)]),
        node_lo=np.concatenate([zero, positions]),
        node_hi=np.concatenate([[len(order)], positions + 1]),
        node_end=np.concatenate([[num_nodes], np.arange(2, num_nodes + 1)]),
        request_node=request_node,
    )


def tree_from_lex_order(tokens: np.ndarray, offsets: np.ndarray, lex: LexOrder) -> PrefixTree:
    """Read the tree off the lexicographic order and neighbour LCPs (steps 2-4 above)."""
    if len(lex.order) == 0:
        return _root_only(tokens, offsets)
    lengths = np.diff(offsets)[lex.order]  # [n] by position
    internal, node_of_bound = _internal_nodes(lex.lcp, lengths)
    nodes, ends_at = _with_leaves(internal, node_of_bound, lex.lcp, lengths)
    return _in_preorder(tokens, offsets, lex.order, nodes, ends_at)


class _Nodes(NamedTuple):
    """Nodes before numbering: positions [lo, hi) of `order`, end depth, parent (same ids)."""

    lo: np.ndarray
    hi: np.ndarray
    end_depth: np.ndarray
    parent: np.ndarray


def _internal_nodes(lcp: np.ndarray, lengths: np.ndarray) -> tuple[_Nodes, np.ndarray]:
    """The LCP intervals (root first), and the node of every inner boundary."""
    n = len(lengths)
    bounds = np.arange(1, n)  # boundary b sits between positions b-1 and b
    left = previous_smaller(lcp)[bounds]  # the -1 sentinels at both ends guarantee both exist
    right = next_smaller(lcp)[bounds]
    # Boundaries of one node share (left end, LCP); the root (0, 0) is always there.
    width = int(lengths.max()) + 1
    keys = np.concatenate([[0], left * width + lcp[bounds]])
    uniq, first, node_of = np.unique(keys, return_index=True, return_inverse=True)
    node_of_bound = np.zeros(n + 1, np.int64)  # the two sentinel boundaries stay unused
    node_of_bound[bounds] = node_of[1:]
    lo, end_depth = uniq // width, uniq % width
    hi = np.concatenate([[n], right])[first]
    # Parent: the node of the enclosing boundary with the larger LCP; a sentinel: the root.
    pick = np.where(lcp[lo] >= lcp[hi], lo, hi)
    parent = np.where((lcp[pick] >= 0) & (end_depth > 0), node_of_bound[pick], 0)
    return _Nodes(lo, hi, end_depth, parent), node_of_bound


def _with_leaves(internal: _Nodes, node_of_bound, lcp, lengths) -> tuple[_Nodes, np.ndarray]:
    """Add a leaf for each request longer than its LCP with both neighbours.

    Returns all nodes and, per position, the node the request there ends at.
    """
    n = len(lengths)
    near = np.maximum(lcp[:-1], lcp[1:])  # [n] deepest LCP with a neighbour, -1 if none
    deeper = np.where(lcp[:-1] >= lcp[1:], np.arange(n), np.arange(1, n + 1))
    holder = np.where(near > 0, node_of_bound[deeper], 0)  # deepest internal node holding q
    leaf_q = np.flatnonzero(lengths > np.maximum(near, 0))
    ends_at = holder.copy()
    ends_at[leaf_q] = len(internal.lo) + np.arange(len(leaf_q))
    nodes = _Nodes(
        np.concatenate([internal.lo, leaf_q]),
        np.concatenate([internal.hi, leaf_q + 1]),
        np.concatenate([internal.end_depth, lengths[leaf_q]]),
        np.concatenate([internal.parent, holder[leaf_q]]),
    )
    return nodes, ends_at


def _in_preorder(tokens, offsets, order, nodes: _Nodes, ends_at) -> PrefixTree:
    """Number nodes in preorder: by first position, then shallower first (ancestors share it)."""
    key = nodes.lo * (int(nodes.end_depth.max()) + 1) + nodes.end_depth
    pre = np.argsort(key, kind="stable")
    rank = np.empty_like(pre)
    rank[pre] = np.arange(len(pre))
    lo, hi, end_depth = nodes.lo[pre], nodes.hi[pre], nodes.end_depth[pre]
    parent = rank[nodes.parent[pre]]
    depth = end_depth[parent]
    depth[0] = 0
    node_end = np.searchsorted(lo, hi, side="left")
    request_node = np.empty(len(order), np.int64)
    request_node[order] = rank[ends_at]
    return PrefixTree(
        tokens=tokens,
        offsets=offsets,
        order=order,
        node_parent=parent,
        node_token_start=offsets[:-1][order[lo]] + depth,
        node_num_tokens=end_depth - depth,
        node_depth=depth,
        node_level=subtree_sum((np.arange(len(lo)) > 0).astype(np.int64), node_end),
        node_lo=lo,
        node_hi=hi,
        node_end=node_end,
        request_node=request_node,
    )


def _root_only(tokens: np.ndarray, offsets: np.ndarray) -> PrefixTree:
    zero = np.zeros(1, np.int64)
    return PrefixTree(
        tokens=tokens,
        offsets=offsets,
        order=np.zeros(0, np.int64),
        node_parent=zero,
        node_token_start=zero,
        node_num_tokens=zero,
        node_depth=zero,
        node_level=zero,
        node_lo=zero,
        node_hi=zero,
        node_end=np.ones(1, np.int64),
        request_node=np.zeros(0, np.int64),
    )


def subtree_sum(value: np.ndarray, node_end: np.ndarray) -> np.ndarray:
    """For every node (preorder), the sum of `value` over its ancestors and itself.

    x lies in y's subtree iff y <= x < node_end[y], so adding value[y] on that range (a
    difference array) and taking a prefix sum gives every root-to-node path sum at once.
    """
    diff = np.zeros(len(value) + 1, value.dtype)
    diff[:-1] = value
    np.subtract.at(diff, node_end, value)
    return np.cumsum(diff[:-1])


def previous_smaller(values: np.ndarray) -> np.ndarray:
    """out[i] = the largest j < i with values[j] < values[i], or -1 if there is none.

    Binary lifting over a sparse table of range minima: O(len log len), all vectorised.
    The table is built over `values` with a front pad of the dtype's minimum, so a jump
    past the start needs no bounds check: it always lands on something smaller.
    """
    dtype = (
        np.int32
        if len(values) and values.max() < 2**31 and values.min() >= -(2**31) + 1
        else np.int64
    )
    levels = max(len(values).bit_length(), 1)
    pad = 1 << (levels - 1)
    padded = np.concatenate([np.full(pad, np.iinfo(dtype).min, dtype), values.astype(dtype)])
    mins = _range_min_table(padded)
    target = padded[pad:]
    pos = np.arange(pad, pad + len(values), dtype=np.int64)  # invariant: values[pos:i] >= values[i]
    for k in range(min(levels, len(mins)) - 1, -1, -1):
        cand = pos - (1 << k)
        pos = np.where(mins[k][cand] >= target, cand, pos)
    return pos - pad - 1


def next_smaller(values: np.ndarray) -> np.ndarray:
    """out[i] = the smallest j > i with values[j] < values[i], or len(values) if there is none."""
    return len(values) - 1 - previous_smaller(values[::-1].copy())[::-1]


def _range_min_table(values: np.ndarray) -> list[np.ndarray]:
    """mins[k][i] = min(values[i : i + 2**k])."""
    mins = [values]
    step = 1
    while 2 * step <= len(values):
        prev = mins[-1]
        mins.append(np.minimum(prev[:-step], prev[step:]))
        step *= 2
    return mins
