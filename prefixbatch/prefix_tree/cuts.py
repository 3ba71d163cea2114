"""Balanced cuts: where to cut a run of work items into K contiguous parts, one per worker.

In: per item, in execution order, its cost (unique prefill + decode tokens) and the prompt
tokens it shares with the item before it; K. Out: [K+1] part starts.

A part starting at item i must recompute what i shares with i-1 (the path the two sides
share), so cutting there costs `shared[i]` duplicated prefill tokens. For the k-th cut, with
target k/K of the total cost, every boundary within half a part of the target is scored
`|cost before it - target| + shared`, both in tokens of work, and the lowest score wins
(ties: the earlier boundary). So a cut moves to a shallow subtree boundary when that costs
less than the imbalance it adds. With no boundary within reach, every remaining one is
scored; parts are empty when there are fewer items than parts. A boundary that `allowed`
marks False is never cut (the samples of one input row stay on one worker: a part file
holds whole rows).

The same scoring runs twice: `groups` cuts the depth-first request order into shards before
cutting groups (so no group straddles a shard), and `shards` cuts a schedule's groups. On a
schedule made for K shards the second finds exactly the first's cuts: each is a group
boundary, and the best of all request boundaries is also the best of the group boundaries.
"""

from __future__ import annotations

import numpy as np


def balanced_cuts(
    cost: np.ndarray, shared: np.ndarray, num_parts: int, allowed: np.ndarray | None = None
) -> np.ndarray:
    """[K+1] starts of `num_parts` contiguous parts of the items; the last is len(cost).

    `cost[i]`: item i's work; `shared[i]`: tokens item i shares with item i-1, recomputed
    when a part starts at i (`shared[0]` is not used); `allowed[i]` (default all True):
    whether a part may start at item i.
    """
    n = len(cost)
    if num_parts == 1:
        return np.array([0, n], np.int64)
    before = np.zeros(n + 1, np.int64)  # cost of the items before each boundary
    np.cumsum(cost, out=before[1:])
    dup_at = np.zeros(n + 1, np.int64)  # tokens duplicated by a cut at each boundary
    dup_at[1:n] = shared[1:]
    if allowed is not None:  # never cut there: scored as worse than any allowed boundary
        forbidden = np.zeros(n + 1, bool)
        forbidden[1:n] = ~np.asarray(allowed, bool)[1:]
        dup_at = np.where(forbidden, np.iinfo(np.int64).max // 4, dup_at)
    total = int(before[-1])
    cuts = [0]
    for k in range(1, num_parts):
        target, reach = total * k / num_parts, total / num_parts / 2
        cuts.append(_best_cut(before, dup_at, target, reach, cuts[-1]))
    cuts.append(n)
    return np.asarray(cuts, np.int64)


def _best_cut(
    before: np.ndarray, dup_at: np.ndarray, target: float, reach: float, previous: int
) -> int:
    """Boundary in (previous, n) minimising |before - target| + dup; n when none is left."""
    n = len(before) - 1
    lo, hi = previous + 1, n - 1
    if lo > hi:
        return n
    near_lo = max(lo, int(np.searchsorted(before, target - reach, side="left")))
    near_hi = min(hi, int(np.searchsorted(before, target + reach, side="right")) - 1)
    if near_lo <= near_hi:
        lo, hi = near_lo, near_hi  # else nothing within reach: score every remaining boundary
    never = np.iinfo(np.int64).max // 4
    if near_lo <= near_hi and (dup_at[lo : hi + 1] >= never).all():
        lo, hi = previous + 1, n - 1  # nothing allowed within reach: every remaining one
    score = np.abs(before[lo : hi + 1] - target) + dup_at[lo : hi + 1]
    best = lo + int(np.argmin(score))
    return n if dup_at[best] >= never else best
