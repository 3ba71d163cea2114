"""`Plan.explain()`: a readable multi-line summary of a plan.

In: a `Plan`. Out: text: sharing statistics, prefill cost with and without sharing, group
sizes and peak KV, shard balance and duplicated prefix tokens, the top shared prefixes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from prefixbatch.prefix_tree.plan import Plan


def explain_plan(plan: Plan) -> str:
    return "\n".join(
        _headline(plan) + _tree(plan) + _groups(plan) + _shards(plan) + _prefixes(plan)
    )


def _headline(plan: Plan) -> list[str]:
    s = plan.stats
    prefill = int(plan.shard_prefill_tokens.sum())
    ratio = s.num_prompt_tokens / prefill if prefill else 1.0
    duplicated = int(plan.shard_duplicated_tokens.sum())
    return [
        (
            f"Plan: {plan.num_requests:,} requests -> {plan.num_groups:,} groups -> "
            f"{plan.num_shards} shards (KV budget {plan.kv_budget_tokens:,} tokens, "
            f"groups up to {plan.group_budget_tokens:,}"
            f"{'' if plan.prefix_sharing else ', prefix sharing off'})"
        ),
        (
            f"Prompt tokens: {s.num_prompt_tokens:,} total, {s.num_unique_tokens:,} unique "
            f"(sharing ratio {s.sharing_ratio:.1%})"
        ),
        (
            f"Prefill cost: {prefill:,} tokens with sharing vs {s.num_prompt_tokens:,} without "
            f"({ratio:.1f}x less; {duplicated:,} duplicated across shards)"
        ),
        f"Decode: {int(plan.group_decode_tokens.sum()):,} tokens expected (sum of max_tokens)",
    ]


def _tree(plan: Plan) -> list[str]:
    s = plan.stats
    return [
        (
            f"Tree: {s.num_nodes:,} nodes, {s.num_leaves:,} leaves; requests end at levels "
            f"{_histogram(s.levels_histogram)}"
        ),
        f"  prompt tokens  min/p50/p90/p99/max {_slash(s.prompt_tokens_quantiles)}",
        f"  shared prefix  min/p50/p90/p99/max {_slash(s.shared_tokens_quantiles)}",
    ]


def _groups(plan: Plan) -> list[str]:
    if plan.num_groups == 0:
        return ["Groups: none"]
    sizes = np.diff(plan.group_starts)
    kv = plan.group_kv_tokens
    over = int(plan.group_over_budget.sum())
    return [
        (
            f"Groups: peak KV {int(kv.max()):,} tokens (p50 {int(np.median(kv)):,}); "
            f"requests per group p50 {int(np.median(sizes)):,}, max {int(sizes.max()):,}; "
            f"{over:,} over budget (single requests larger than the budget)"
        ),
    ]


def _shards(plan: Plan) -> list[str]:
    cost = plan.shard_prefill_tokens + plan.shard_decode_tokens
    mean = cost.mean() if len(cost) else 0
    balance = f"max/mean {cost.max() / mean:.3f}" if mean else "empty"
    return [f"Shards: cost {', '.join(f'{int(c):,}' for c in cost)} ({balance})"]


def _prefixes(plan: Plan) -> list[str]:
    lines = (
        ["Top shared prefixes (by tokens their own segment saves):"]
        if plan.stats.top_prefixes
        else []
    )
    for rank, p in enumerate(plan.stats.top_prefixes, 1):
        text = f" {p.text!r}" if p.text is not None else ""
        lines.append(
            f"  {rank}. node {p.node_id}: {p.num_tokens:,} tokens (+{p.num_segment_tokens:,}) x "
            f"{p.num_requests:,} requests, saves {p.num_tokens_saved:,}; tokens[{p.token_span[0]}:"
            f"{p.token_span[1]}]{text}"
        )
    return lines


def _slash(values) -> str:
    return "/".join(f"{v:,}" for v in values)


def _histogram(counts) -> str:
    return ", ".join(f"L{level}: {c:,}" for level, c in enumerate(counts) if c)
