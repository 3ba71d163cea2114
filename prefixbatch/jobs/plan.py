"""`prefixbatch plan`: what a job would do, found without loading any weights.

Reads and tokenizes the input and makes the plan exactly as `run` makes it (`planning`:
same settings, same digest; rows a resume keeps are left out as `run` leaves them), and reports sharing statistics and the cost with and without sharing:
prefill tokens, and peak KV tokens per group.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefixbatch.executors.registry import ResolvedExecutor
from prefixbatch.jobs.inputs import job_tokenizer, read_job_input
from prefixbatch.jobs.planning import plan_job, plan_summary, resolve_job_executor
from prefixbatch.jobs.run import committed_before
from prefixbatch.jobs.spec import JobSpec, with_local_model
from prefixbatch.pipeline.prepare import PreparedInput
from prefixbatch.prefix_tree import Plan, PlannedRequests


@dataclass(frozen=True)
class JobPlan:
    prepared: PreparedInput  # every row of the input
    todo: PreparedInput  # the rows the run would generate (all but those a resume keeps)
    work: PlannedRequests  # the plan `run` executes over `todo.requests`
    resolved: ResolvedExecutor  # the executor it is planned for, as `run` resolves it

    @property
    def plan(self) -> Plan:
        return self.work.plan


def preview_job(spec: JobSpec, *, num_shards: int | None = None) -> JobPlan:
    """The plan `run` would execute now (the same call `run` makes), without loading weights.

    `num_shards` previews another cut; by default it is the run's: 1 in one process, workers
    × `cluster.shards_per_worker` on Dask (a running cluster at `cluster.address` is asked
    how many workers it has).
    """
    spec = with_local_model(spec, weights=False)
    resolved = resolve_job_executor(spec)
    prepared = read_job_input(spec)
    todo = prepared.without_rows(committed_before(spec, prepared))
    if num_shards is None:
        num_shards = 1
        if spec.cluster.kind == "dask":
            from prefixbatch.cluster.dask_run import count_shards

            num_shards = count_shards(spec.cluster)
    tokenizer = job_tokenizer(spec)
    work = plan_job(spec, resolved, todo.requests, num_shards=num_shards, decode=lambda ids: tokenizer.decode(ids.tolist()))
    return JobPlan(prepared, todo, work, resolved)


def peak_kv_without_sharing(job: JobPlan) -> int:
    """The largest group's KV if every member held its whole prompt on its own."""
    plan = job.plan
    per_request = np.array([r.num_prompt_tokens + r.sampling.max_tokens for r in job.work.requests], np.int64)
    in_order = per_request[plan.request_order]
    sums = np.add.reduceat(in_order, plan.group_starts[:-1]) if plan.num_groups else np.zeros(0)
    return int(sums.max(initial=0))


def plan_report(job: JobPlan, spec: JobSpec) -> dict:
    """The numbers `plan --json` prints (the full plan arrays are left out: they scale with the job)."""
    prepared, plan = job.prepared, job.plan
    codes = Counter(c.error.split(":", 1)[0] for c in prepared.errors if c.error)
    stats = plan.stats
    prefill_with = plan.num_prefill_tokens
    return {
        "job": spec.name,
        "plan": plan_summary(job.work),
        "rows": prepared.num_rows,
        "resumed_rows": prepared.num_rows - job.todo.num_rows,
        "requests": len(job.todo.requests),
        "error_rows": len(prepared.errors),
        "errors_by_code": dict(sorted(codes.items())),
        "prompt_tokens": stats.num_prompt_tokens,
        "unique_prompt_tokens": stats.num_unique_tokens,
        "sharing_ratio": round(stats.sharing_ratio, 4),
        "longest_prompt_tokens": int(stats.prompt_tokens_quantiles[-1]) if stats.num_requests else 0,
        "max_output_tokens": plan.num_decode_tokens,
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
        + (f"{report['resumed_rows']:,} committed before (resume), " if report["resumed_rows"] else "")
        + f"{report['error_rows']:,} error rows"
        + (f" ({', '.join(f'{k}={v}' for k, v in report['errors_by_code'].items())})" if report["errors_by_code"] else ""),
        f"Longest prompt: {report['longest_prompt_tokens']:,} tokens; "
        f"expected output up to {report['max_output_tokens']:,} tokens",
        f"Peak KV per group: {kv['with_sharing']:,} tokens with sharing vs {kv['without_sharing']:,} without",
        job.plan.explain(),
        f"Plan digest {report['plan']['digest']} (the run's summary carries the same when it executes this plan)",
    ]
    return "\n".join(lines)


def write_plan_report(job: JobPlan, spec: JobSpec, path: str | Path, report: dict | None = None) -> Path:
    """The HTML picture of the plan; `report`: `plan_report`'s numbers when already made."""
    from prefixbatch.jobs.report import write_report
    from prefixbatch.prefix_tree import build_tree

    tokenizer = job_tokenizer(spec).tokenizer
    work = job.work  # its token array is the prompts' in request order
    offsets = np.zeros(len(work.requests) + 1, np.int64)
    np.cumsum([len(r.token_ids) for r in work.requests], out=offsets[1:])
    return write_report(
        path,
        build_tree(work.tokens, offsets, share=work.plan.prefix_sharing),
        job.plan.stats,
        title=f"prefixbatch plan: {spec.name}",
        decode=lambda ids: tokenizer.decode(ids.tolist()),
        facts=_plan_facts(job, report or plan_report(job, spec)),
    )


def _plan_facts(job: JobPlan, report: dict):
    from prefixbatch.jobs.report import PlanFacts

    plan = job.plan
    request_shard = np.zeros(plan.num_requests, np.int64)
    for shard in plan.shards():
        first, end = int(plan.group_starts[shard.group_ids.start]), int(plan.group_starts[shard.group_ids.stop])
        request_shard[plan.request_order[first:end]] = shard.shard_id
    return PlanFacts(
        request_shard=request_shard,
        num_shards=plan.num_shards,
        prefill_tokens=(report["prefill_tokens"]["without_sharing"], report["prefill_tokens"]["with_sharing"]),
        peak_kv_tokens=(report["peak_kv_tokens_per_group"]["without_sharing"],
                        report["peak_kv_tokens_per_group"]["with_sharing"]),
        error_rows=report["errors_by_code"],
    )


def estimate_time(job: JobPlan, spec: JobSpec, *, sample_requests: int = 64, sample_tokens: int = 16) -> dict:
    """A time estimate for the plan, calibrated on this machine with the job's own model and
    requests: loads the executor, runs the first `sample_requests` requests of the plan's
    order twice — prompts only, then with up to `sample_tokens` output tokens each — and
    extrapolates the measured prefill and decode rates to the plan's tokens. Decode is an
    upper bound (every row to its max_tokens); rows that stop early take less. Writes nothing."""
    import time
    from dataclasses import replace

    from prefixbatch.executors.registry import create_executor
    from prefixbatch.prefix_tree import PlanSettings, plan_requests

    started = time.perf_counter()
    executor = create_executor(spec.model, spec.executor, job.resolved)
    load_s = time.perf_counter() - started
    plan = job.plan
    order = [int(i) for i in plan.request_order[:sample_requests]]
    sample = [job.work.requests[i] for i in order]
    settings = PlanSettings(kv_budget_tokens=plan.kv_budget_tokens, prefix_sharing=plan.prefix_sharing)

    def timed(requests) -> tuple[float, int, int]:
        before = executor.stats.copy()
        started = time.perf_counter()
        list(executor.generate(plan_requests(requests, settings)))
        done = executor.stats.since(before)
        return time.perf_counter() - started, done.num_prefill_tokens, done.num_decode_tokens

    prompts_only = [replace(r, sampling=replace(r.sampling, max_tokens=0, min_tokens=0)) for r in sample]
    timed(prompts_only[:4])  # warm-up
    prefill_s, prefill_tokens, _ = timed(prompts_only)
    decoding = [replace(r, sampling=replace(r.sampling, max_tokens=min(r.sampling.max_tokens, sample_tokens),
                                             min_tokens=min(r.sampling.min_tokens, sample_tokens))) for r in sample]
    both_s, both_prefill, decode_tokens = timed(decoding)
    prefill_rate = prefill_tokens / max(prefill_s, 1e-9)
    decode_s = max(both_s - both_prefill / prefill_rate, 1e-9)
    decode_rate = decode_tokens / decode_s if decode_tokens else 0.0
    est_prefill = plan.num_prefill_tokens / prefill_rate if prefill_rate else 0.0
    est_decode = plan.num_decode_tokens / decode_rate if decode_rate else 0.0
    return {
        "how": (f"calibrated on this machine: the first {len(sample)} requests of the plan, prompts only, then "
                f"with up to {sample_tokens} output tokens each, on the {executor.kind} executor"),
        "model_load_s": round(load_s, 1),
        "prefill_tokens_per_s": round(prefill_rate, 1),
        "decode_tokens_per_s": round(decode_rate, 1),
        "prefill_s": round(est_prefill, 1),
        "decode_s_at_most": round(est_decode, 1),
        "total_s_at_most": round(load_s + est_prefill + est_decode, 1),
        "calibration_s": round(time.perf_counter() - started - load_s, 1),
    }


def estimate_text(estimate: dict) -> str:
    def span(seconds: float) -> str:
        return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"

    return (
        f"Estimate: up to {span(estimate['total_s_at_most'])} — model load {span(estimate['model_load_s'])}, prefill "
        f"~{span(estimate['prefill_s'])} at {estimate['prefill_tokens_per_s']:,.0f} tok/s, decode up to "
        f"{span(estimate['decode_s_at_most'])} at {estimate['decode_tokens_per_s']:,.0f} tok/s (every row to its "
        f"max_tokens; rows that stop early take less).\n  How: {estimate['how']} "
        f"({estimate['calibration_s']:.0f} s). One process; a Dask run divides the work among its workers."
    )
