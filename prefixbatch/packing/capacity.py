"""How many KV slots a plan's run gets: the budget, stretched for an over-budget group, capped.

A group alone over the budget (a single request too long for it) must still run, so the
store holds at least the largest group's `group_kv_tokens`; and it never needs more than
every segment of the plan at once (each node, each request's own segment), which matters
because the store is allocated, zeroed, up front: small jobs get small stores.

in → out: `Plan` + per-request `max_tokens` + the KV budget → capacity in tokens (slots).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prefixbatch.prefix_tree import ROOT, Plan

__all__ = ["store_capacity"]


def store_capacity(plan: Plan, max_tokens: Sequence[int], *, kv_budget_tokens: int) -> int:
    """Slots a run's store needs: the budget, enough for an over-budget group, no more than all."""
    # An over-budget single request still has to fit on its own; and the store needs no more
    # than every segment of the plan at once (it is allocated zeroed: sized to the job).
    capacity = max(kv_budget_tokens, int(plan.group_kv_tokens.max(initial=1)))
    return min(capacity, _most_tokens_held(plan, max_tokens))


def _most_tokens_held(plan: Plan, max_tokens: Sequence[int]) -> int:
    """Slots of every segment the run allocates (each tree node, each request's own), at once."""
    nodes = np.maximum(np.delete(plan.node_num_tokens, ROOT), 1).sum()
    return int(nodes) + sum(max(int(m), 1) for m in max_tokens)
