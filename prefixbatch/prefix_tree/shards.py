"""Shards: the ordered groups cut into K contiguous runs, one per worker.

In: a `Schedule` and K. Out: `Shards`.

A shard is a run of consecutive groups, so every subtree cut by no shard boundary stays on
one worker, and within a shard the depth-first KV lifetimes hold unchanged. Cutting
between groups g and g+1 makes both workers compute the path the two sides share: exactly
the LCP of the last request of g and the first of g+1 (`num_cached_tokens` there), which
the second shard prefills again.

Cut choice: a group's cost is its unique prefill tokens plus its decode tokens. For the
k-th cut, with target k/K of the total, every group boundary within half a shard of the
target is scored `|cumulative cost - target| + duplicated tokens`, both in tokens of work,
and the lowest score wins (ties: the earlier boundary). So a cut moves to a shallow subtree
boundary when that costs less than the imbalance it adds. Shards can be empty when there
are fewer groups than shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefixbatch.prefix_tree.groups import Schedule


@dataclass(frozen=True, eq=False)
class Shards:
    group_starts: np.ndarray  # [K+1] shard k holds groups group_starts[k]:group_starts[k+1]
    prefill_tokens: np.ndarray  # [K] unique prefill in the shard, duplicated path included
    decode_tokens: np.ndarray  # [K]
    duplicated_tokens: np.ndarray  # [K] path tokens the shard recomputes because of its cut

    @property
    def num_shards(self) -> int:
        return len(self.group_starts) - 1

    @property
    def cost(self) -> np.ndarray:
        """[K] estimated work: prefill tokens + decode tokens."""
        return self.prefill_tokens + self.decode_tokens


def cut_shards(schedule: Schedule, num_shards: int) -> Shards:
    """Cut the schedule's groups into `num_shards` balanced contiguous shards."""
    num_groups = schedule.num_groups
    cost = schedule.group_prefill_tokens + schedule.group_decode_tokens
    before = np.concatenate([[0], np.cumsum(cost)])  # [G+1] cost of groups before each boundary
    dup_at = np.zeros(num_groups + 1, np.int64)  # path shared across each boundary
    dup_at[1:num_groups] = schedule.num_cached_tokens[schedule.group_starts[1:num_groups]]
    total = int(before[-1])
    cuts = [0]
    for k in range(1, num_shards):
        cuts.append(
            _best_cut(before, dup_at, total * k / num_shards, total / num_shards / 2, cuts[-1])
        )
    cuts.append(num_groups)
    group_starts = np.asarray(cuts, np.int64)
    dup = dup_at[group_starts[:-1]]
    dup[0] = 0
    return Shards(
        group_starts=group_starts,
        prefill_tokens=_run_sums(schedule.group_prefill_tokens, group_starts) + dup,
        decode_tokens=_run_sums(schedule.group_decode_tokens, group_starts),
        duplicated_tokens=dup,
    )


def _run_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of values[starts[k]:starts[k+1]] (empty runs give 0)."""
    return np.diff(np.concatenate([[0], np.cumsum(values)])[starts])


def _best_cut(
    before: np.ndarray, dup_at: np.ndarray, target: float, reach: float, previous: int
) -> int:
    """Boundary index in (previous, G) minimising |before - target| + dup; G when none is left."""
    num_groups = len(before) - 1
    lo, hi = previous + 1, num_groups - 1
    if lo > hi:
        return num_groups
    near_lo = max(lo, int(np.searchsorted(before, target - reach, side="left")))
    near_hi = min(hi, int(np.searchsorted(before, target + reach, side="right")) - 1)
    if near_lo <= near_hi:
        lo, hi = near_lo, near_hi  # else nothing within reach: score every remaining boundary
    score = np.abs(before[lo : hi + 1] - target) + dup_at[lo : hi + 1]
    return lo + int(np.argmin(score))
