"""The planning entry point and shard parts: what executors are handed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.prefix_tree import ROOT, PlannedRequests, PlanSettings, plan_requests
from prefixbatch.types import Request, SamplingParams
from tests.prefix_tree.conftest import EXAMPLE, EXAMPLE_MAX_TOKENS


def requests_of(prompts, max_tokens, rows=None) -> list[Request]:
    rows = range(len(prompts)) if rows is None else rows
    return [
        Request(row, tuple(p), SamplingParams(max_tokens=int(m)), sample_index=0)
        for row, p, m in zip(rows, prompts, max_tokens)
    ]


def prompt_of(part: PlannedRequests, request_id: int) -> list[int]:
    """A request's prompt rebuilt from the part's own nodes and tokens."""
    plan, node, spans = part.plan, int(part.plan.request_node[request_id]), []
    while node != ROOT:
        start, count = int(plan.node_token_start[node]), int(plan.node_num_tokens[node])
        spans.append(part.tokens[start : start + count].tolist())
        node = int(plan.node_parent[node])
    return [t for span in reversed(spans) for t in span]


def check_parts(work: PlannedRequests) -> None:
    plan, seen = work.plan, []
    for k in range(plan.num_shards):
        part = work.shard(k)
        shard = plan.shard(k)
        assert part.plan.num_shards == 1 and part.plan.num_groups == len(shard.group_ids)
        assert len(part.requests) == shard.num_requests
        assert part.plan.request_order.tolist() == list(range(shard.num_requests))
        for i, request in enumerate(part.requests):
            assert prompt_of(part, i) == list(request.token_ids)
        # every node the part uses is computed once in it: the shard's predicted prefill
        used = {x for g in part.plan.groups() for x in g.new_node_ids if x != ROOT}
        assert sum(int(part.plan.node_num_tokens[x]) for x in used) == shard.num_prefill_tokens
        assert part.plan.num_prefill_tokens == shard.num_prefill_tokens
        assert all(g.node_ids == tuple(sorted(g.node_ids)) for g in part.plan.groups())
        seen += [(r.row_index, r.sample_index) for r in part.requests]
    assert sorted(seen) == sorted((r.row_index, r.sample_index) for r in work.requests)


def test_example_cut_in_two_shards():
    work = plan_requests(
        requests_of(EXAMPLE, EXAMPLE_MAX_TOKENS), PlanSettings(kv_budget_tokens=24, num_shards=2)
    )
    assert work.plan.group_budget_tokens == 12 and work.plan.kv_budget_tokens == 24
    assert work.plan.num_shards == 2
    check_parts(work)
    second = work.shard(1)
    assert [r.row_index for r in second.requests] == [1, 2, 0, 5, 4]
    assert second.plan.node_num_tokens.tolist()[1:] == [2, 1, 1, 1, 1, 2]


def test_samples_of_a_row_are_never_cut_apart():
    # one row with 6 samples of the same prompt and one other row: balance alone would cut
    # between the samples
    prompts = [[1, 2, 3]] * 6 + [[4, 5, 6]]
    requests = [
        Request(0 if i < 6 else 1, tuple(p), SamplingParams(max_tokens=4), sample_index=i % 6)
        for i, p in enumerate(prompts)
    ]
    work = plan_requests(requests, PlanSettings(kv_budget_tokens=1000, num_shards=2))
    rows = [{r.row_index for r in part.requests} for part in work.shards()]
    assert sorted(map(sorted, rows)) == [[0], [1]]
    check_parts(work)


def test_digest_is_the_plan():
    requests = requests_of(EXAMPLE, EXAMPLE_MAX_TOKENS)
    one = plan_requests(requests, PlanSettings(kv_budget_tokens=24))
    assert one.plan.digest() == plan_requests(requests, PlanSettings(kv_budget_tokens=24)).plan.digest()
    for other in (PlanSettings(kv_budget_tokens=26), PlanSettings(24, num_shards=2), PlanSettings(24, prefix_sharing=False)):
        assert plan_requests(requests, other).plan.digest() != one.plan.digest()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=6), min_size=1, max_size=14),
    st.integers(1, 5),
    st.integers(4, 40),
    st.booleans(),
)
def test_shard_parts_hold_exactly_their_shard(prompts, num_shards, budget, share):
    max_tokens = np.arange(len(prompts)) % 3 + 1
    work = plan_requests(
        requests_of(prompts, max_tokens),
        PlanSettings(kv_budget_tokens=budget, num_shards=num_shards, prefix_sharing=share),
    )
    check_parts(work)


def test_settings_are_checked():
    with pytest.raises(Exception, match="kv_budget_tokens"):
        plan_requests(requests_of(EXAMPLE, EXAMPLE_MAX_TOKENS), PlanSettings(kv_budget_tokens=0))
