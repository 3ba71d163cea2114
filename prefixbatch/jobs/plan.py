"""`prefixbatch plan`: what a job would do, found without loading any weights.

Reads and tokenizes the input, builds the global prefix tree and the plan (groups under the
KV budget, shards), and reports sharing statistics and the cost with and without sharing:
prefill tokens, and peak KV tokens per group.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefixbatch.jobs.run import prompt_tokenizer, read_job_input
from prefixbatch.jobs.spec import JobSpec
from prefixbatch.pipeline.prepare import PreparedInput
from prefixbatch.prefix_tree import (
    Plan,
    PrefixTree,
    assemble_plan,
    build_tree,
    check_prompts,
    cut_shards,
    schedule_groups,
    tree_stats,
)
from prefixbatch.prefix_tree.requests import prompt_arrays

DEFAULT_CPU_KV_BUDGET = 131_072  # tokens; the native engine sizes it from device memory on CUDA


@dataclass(frozen=True)
class JobPlan:
    prepared: PreparedInput
    tree: PrefixTree
    plan: Plan


def plan_job(spec: JobSpec, *, num_shards: int = 1, kv_budget_tokens: int | None = None) -> JobPlan:
    """Tokenize the job and plan it; request ids of the plan index `prepared.requests`."""
    prepared = read_job_input(spec)
    tokenizer = prompt_tokenizer(spec)
    tokens, offsets, max_tokens = prompt_arrays(prepared.requests)
    prompts = check_prompts(tokens, offsets, max_tokens)
    tree = build_tree(prompts.tokens, prompts.offsets)
    stats = tree_stats(tree, decode=lambda ids: tokenizer.decode(ids.tolist()))
    budget = kv_budget_tokens or spec.executor.kv_budget_tokens or DEFAULT_CPU_KV_BUDGET
    schedule = schedule_groups(
        tree, prompts.max_tokens, kv_budget_tokens=budget, num_shards=num_shards
    )
    plan = assemble_plan(tree, stats, schedule, cut_shards(schedule, num_shards))
    return JobPlan(prepared, tree, plan)


def peak_kv_without_sharing(job: JobPlan) -> int:
    """The largest group's KV if every member held its whole prompt on its own."""
    plan = job.plan
    per_request = np.array(
        [r.num_prompt_tokens + r.sampling.max_tokens for r in job.prepared.requests], np.int64
    )
    in_order = per_request[plan.request_order]
    sums = np.add.reduceat(in_order, plan.group_starts[:-1]) if plan.num_groups else np.zeros(0)
    return int(sums.max(initial=0))


def plan_report(job: JobPlan, spec: JobSpec) -> dict:
    """The numbers `plan --json` prints (the full plan arrays are left out: they scale with the job)."""
    prepared, plan = job.prepared, job.plan
    codes = Counter(c.error.split(":", 1)[0] for c in prepared.errors if c.error)
    stats = plan.stats
    prefill_with = int(plan.shard_prefill_tokens.sum())
    return {
        "job": spec.name,
        "rows": prepared.num_rows,
        "requests": len(prepared.requests),
        "error_rows": len(prepared.errors),
        "errors_by_code": dict(sorted(codes.items())),
        "prompt_tokens": stats.num_prompt_tokens,
        "unique_prompt_tokens": stats.num_unique_tokens,
        "sharing_ratio": round(stats.sharing_ratio, 4),
        "longest_prompt_tokens": int(stats.prompt_tokens_quantiles[-1]) if stats.num_requests else 0,
        "max_output_tokens": int(plan.group_decode_tokens.sum()),
        "rows_with_clamped_max_tokens": prepared.num_clamped,
        "prefill_tokens": {"without_sharing": stats.num_prompt_tokens, "with_sharing": prefill_with},
        "peak_kv_tokens_per_group": {
            "without_sharing": peak_kv_without_sharing(job),
            "with_sharing": int(plan.group_kv_tokens.max(initial=0)),
        },
        "kv_budget_tokens": plan.kv_budget_tokens,
        "groups": plan.num_groups,
        "groups_over_budget": int(plan.group_over_budget.sum()),
        "shards": [
            {
                "requests": s.num_requests,
                "groups": len(s.group_ids),
                "prefill_tokens": s.num_prefill_tokens,
                "decode_tokens": s.num_decode_tokens,
                "duplicated_prefix_tokens": s.num_duplicated_tokens,
            }
            for s in plan.shards()
        ],
        "tree": {k: v for k, v in stats.to_dict().items() if k != "top_prefixes"},
        "top_prefixes": [
            {
                "requests": p.num_requests,
                "prefix_tokens": p.num_tokens,
                "segment_tokens": p.num_segment_tokens,
                "tokens_saved": p.num_tokens_saved,
                "text": p.text,
            }
            for p in stats.top_prefixes
        ],
    }


def plan_text(job: JobPlan, report: dict) -> str:
    """What `plan` prints for a person: the input's size, then the plan's own summary."""
    kv = report["peak_kv_tokens_per_group"]
    lines = [
        f"Job {report['job']}: {report['rows']:,} rows, {report['requests']:,} to generate, "
        f"{report['error_rows']:,} error rows"
        + (f" ({', '.join(f'{k}={v}' for k, v in report['errors_by_code'].items())})" if report["errors_by_code"] else ""),
        f"Longest prompt: {report['longest_prompt_tokens']:,} tokens; "
        f"expected output up to {report['max_output_tokens']:,} tokens",
        f"Peak KV per group: {kv['with_sharing']:,} tokens with sharing vs {kv['without_sharing']:,} without",
        job.plan.explain(),
    ]
    return "\n".join(lines)


def write_plan_report(job: JobPlan, spec: JobSpec, path: str | Path) -> Path:
    from prefixbatch.jobs.report import write_report

    tokenizer = prompt_tokenizer(spec).tokenizer
    return write_report(
        path,
        job.tree,
        job.plan.stats,
        title=f"prefixbatch plan: {spec.name}",
        decode=lambda ids: tokenizer.decode(ids.tolist()),
    )
