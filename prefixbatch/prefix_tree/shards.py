"""Shards: the ordered groups cut into K contiguous runs, one per worker.

In: a `Schedule` and K. Out: `Shards`.

A shard is a run of consecutive groups, so every subtree cut by no shard boundary stays on
one worker, and within a shard the depth-first KV lifetimes hold unchanged. Cutting
between groups g and g+1 makes both workers compute the path the two sides share: exactly
the LCP of the last request of g and the first of g+1 (`num_cached_tokens` there), which
the second shard prefills again.

A group's cost is its unique prefill tokens plus its decode tokens; the cuts balance it
and prefer shallow subtree boundaries (`cuts.py`). Balance needs boundaries to choose
from: a schedule made for the same K (`schedule_groups(..., num_shards=K)`) has a group
boundary at each balanced cut, found here again, whatever the KV budget. A schedule made
for one shard can have fewer groups than shards (a large budget), and then shards are
empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefixbatch.prefix_tree.cuts import balanced_cuts
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
    cost = schedule.group_prefill_tokens + schedule.group_decode_tokens
    shared = schedule.num_cached_tokens[schedule.group_starts[:-1]]  # [G] LCP at each group start
    made_for = schedule.shard_group_starts
    if made_for is not None and len(made_for) == num_shards + 1:
        group_starts = made_for  # the cuts the groups were made for (rows kept whole there)
    else:
        group_starts = balanced_cuts(cost, shared, num_shards)
    dup = np.zeros(num_shards, np.int64)
    dup[1:] = np.append(shared, 0)[group_starts[1:-1]]  # an empty shard at the end shares nothing
    return Shards(
        group_starts=group_starts,
        prefill_tokens=_run_sums(schedule.group_prefill_tokens, group_starts) + dup,
        decode_tokens=_run_sums(schedule.group_decode_tokens, group_starts),
        duplicated_tokens=dup,
    )


def _run_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of values[starts[k]:starts[k+1]] (empty runs give 0)."""
    return np.diff(np.concatenate([[0], np.cumsum(values)])[starts])
