"""Plans for executor tests, made as a job's run makes them (`jobs.planning`'s settings)."""

from __future__ import annotations

from prefixbatch.executors.config import ExecutorSpec
from prefixbatch.executors.registry import EXECUTORS
from prefixbatch.jobs.planning import DEFAULT_CPU_KV_BUDGET
from prefixbatch.prefix_tree import PlannedRequests, PlanSettings, plan_requests


def planned(requests, spec: ExecutorSpec | None = None, *, kind: str = "native") -> PlannedRequests:
    """The plan a run would hand an executor of `kind` with the `executor` section `spec`."""
    spec = spec or ExecutorSpec()
    settings = PlanSettings(
        kv_budget_tokens=spec.kv_budget_tokens or DEFAULT_CPU_KV_BUDGET,
        prefix_sharing=spec.prefix_sharing and EXECUTORS[kind].shares_prefixes,
    )
    return plan_requests(requests, settings)
