from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from prefixbatch.errors import PrefixbatchError
from prefixbatch.prefix_tree import (
    Group,
    Plan,
    PlanInputError,
    Shard,
    build_plan,
    prompts_from_arrow,
)
from tests.prefix_tree.conftest import EXAMPLE, EXAMPLE_MAX_TOKENS
from tests.prefix_tree.naive import flat


@pytest.fixture
def plan(example) -> Plan:
    return build_plan(*example, EXAMPLE_MAX_TOKENS, kv_budget_tokens=12, num_shards=2)


def test_example_groups_and_shards(plan):
    assert list(plan.groups()) == [
        Group(0, 0, (3,), (0, 1), (0, 1), 102, 2, 100, True),
        # Shard 1 starts here: it recomputes [1 2] (node 1), prefilled in shard 0 too.
        Group(1, 1, (1, 2), (0, 1, 2, 5), (0, 1, 2, 5), 10, 4, 6, False),
        Group(2, 1, (0, 5), (0, 1, 2, 3, 4), (3, 4), 10, 2, 5, False),
        Group(3, 1, (4,), (0, 6), (6,), 4, 2, 2, False),
    ]
    assert list(plan.shards()) == [
        Shard(0, range(1), 1, 2, 100, 0),
        Shard(1, range(1, 4), 5, 8, 13, 2),
    ]
    assert plan.request_num_cached_tokens.tolist() == [0, 0, 4, 3, 4, 0]
    assert plan.node_token_start.tolist() == [12, 12, 2, 3, 20, 7, 14]  # the root is empty


def test_plan_without_sharing_prefills_every_prompt_in_full(example):
    plan = build_plan(*example, EXAMPLE_MAX_TOKENS, kv_budget_tokens=1000, share=False)
    assert plan.stats.num_unique_tokens == plan.stats.num_prompt_tokens == 21
    assert plan.stats.sharing_ratio == 0.0 and plan.stats.top_prefixes == ()
    assert plan.request_num_cached_tokens.tolist() == [0] * 6
    assert int(plan.group_prefill_tokens.sum()) == 21
    assert plan.num_groups == 1
    assert plan.group(0).num_kv_tokens == 21 + int(EXAMPLE_MAX_TOKENS.sum())


def test_json_round_trip(plan):
    text = json.dumps(plan.to_dict())
    again = Plan.from_dict(json.loads(text))
    assert again == plan
    assert again.group(2) == plan.group(2)
    assert again.stats == plan.stats
    with pytest.raises(PlanInputError, match="format"):
        Plan.from_dict({**plan.to_dict(), "format": "other/9"})


def test_explain(plan):
    text = plan.explain()
    assert "6 requests -> 4 groups -> 2 shards (KV budget 12 tokens, groups up to 12)" in text
    assert "21 total, 8 unique (sharing ratio 61.9%)" in text
    assert "Prefill cost: 10 tokens with sharing vs 21 without" in text
    assert "2 duplicated across shards" in text
    assert "peak KV 102 tokens" in text and "1 over budget" in text
    assert "node 1: 2 tokens (+2) x 5 requests, saves 8; tokens[12:14]" in text


def test_arrow_layout_with_a_slice():
    prompts = pa.array([[9, 9], *EXAMPLE], type=pa.list_(pa.int32())).slice(1)
    tokens, offsets = prompts_from_arrow(prompts)
    assert offsets[0] == 2  # a slice keeps the parent's offsets
    sliced = build_plan(tokens, offsets, EXAMPLE_MAX_TOKENS, kv_budget_tokens=12, num_shards=2)
    direct = build_plan(*flat(EXAMPLE), EXAMPLE_MAX_TOKENS, kv_budget_tokens=12, num_shards=2)
    assert list(sliced.groups()) == list(direct.groups())
    assert (sliced.node_token_start - direct.node_token_start).tolist() == [2] * 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokens": np.zeros((2, 2), np.int32)}, "`tokens` must be a 1-D integer array"),
        ({"tokens": np.array([1.5])}, "`tokens` must be a 1-D integer array"),
        ({"tokens": np.array([2**40])}, "`tokens` must fit in int32"),
        (
            {"offsets": np.array([0, 3, 2]), "max_tokens": np.array([1, 1])},
            r"`offsets` must be non-decreasing, got offsets\[1\]=3",
        ),
        ({"offsets": np.array([0, 9])}, r"`offsets` must lie in \[0, 3\]"),
        ({"max_tokens": np.array([1, 2])}, "`max_tokens` must be a 1-D integer array of length 1"),
        ({"max_tokens": np.array([-1])}, r"`max_tokens` must be >= 0, got max_tokens\[0\]=-1"),
        ({"kv_budget_tokens": 0}, "`kv_budget_tokens` must be an integer >= 1, got 0"),
        ({"num_shards": 1.5}, "`num_shards` must be an integer >= 1, got 1.5"),
        ({"policy": "random"}, r"`policy` must be one of \['decode_ratio_first', .*got 'random'"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, message):
    args = {
        "tokens": np.array([1, 2, 3]),
        "offsets": np.array([0, 3]),
        "max_tokens": np.array([4]),
        "kv_budget_tokens": 10,
        **kwargs,
    }
    with pytest.raises(PlanInputError, match=message) as info:
        build_plan(args.pop("tokens"), args.pop("offsets"), args.pop("max_tokens"), **args)
    assert isinstance(info.value, PrefixbatchError) and isinstance(info.value, ValueError)


def test_int64_tokens_are_accepted():
    plan = build_plan(np.array([5, 6, 5, 7], np.int64), [0, 2, 4], [1, 1], kv_budget_tokens=10)
    assert plan.stats.num_unique_tokens == 3


def test_planner_never_imports_torch():
    code = (
        "import sys, prefixbatch.prefix_tree as p\n"
        "p.build_plan([1], [0, 1], [1], kv_budget_tokens=5)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
