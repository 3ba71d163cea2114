"""`prefixbatch plan`: what a job would do, found without loading any weights.

For now: rows, prompt tokens, the longest prompt, error rows. The prefix-tree planner
adds sharing statistics, groups and shards here.
"""

from __future__ import annotations

from collections import Counter

from prefixbatch.jobs.run import read_job_input
from prefixbatch.jobs.spec import JobSpec


def plan_report(spec: JobSpec) -> dict:
    prepared = read_job_input(spec)
    lengths = [r.num_prompt_tokens for r in prepared.requests]
    codes = Counter(c.error.split(":", 1)[0] for c in prepared.errors if c.error)
    return {
        "job": spec.name,
        "rows": prepared.num_rows,
        "requests": len(prepared.requests),
        "error_rows": len(prepared.errors),
        "errors_by_code": dict(sorted(codes.items())),
        "prompt_tokens": sum(lengths),
        "longest_prompt_tokens": max(lengths, default=0),
        "max_output_tokens": sum(r.sampling.max_tokens for r in prepared.requests),
        "rows_with_clamped_max_tokens": prepared.num_clamped,
    }
