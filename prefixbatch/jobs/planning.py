"""The one place a job's plan is made: the executor and settings resolved once, then `plan_requests`.

`prefixbatch plan` and `prefixbatch run` both call `plan_job`, so the plan a user previews
is the plan the run executes: same settings, same digest. `resolve_job_executor` decides,
once where a job is loaded, what runs it (`ResolvedExecutor`: kind, device, dtype by the
registry's rules) and the KV budget, and every setting that shapes the plan is read from it
or the spec here, with its one default:

- the KV budget: `executor.kv_budget_tokens`, else on CUDA what free device memory holds
  after the weights (bytes per KV token from the model's config.json; no weights loaded),
  else on the CPU `DEFAULT_CPU_KV_BUDGET` or what half the memory available after the weights
  holds, whichever is less (a model with a large KV per token); a group may take
  `GROUP_SHARE` of it. An engine that sizes its own cache (vLLM) reports what it holds once
  loaded, and that is the budget (`with_loaded_cache`);
- prefix sharing: `executor.prefix_sharing`, and off for an executor that cannot share
  (`hf`), so the plan predicts exactly what that executor computes;
- shards: 1 in one process; on Dask, workers × `cluster.shards_per_worker`.

in: the spec + the requests to run → out: `PlannedRequests`, and its summary for reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from prefixbatch.executors.registry import ResolvedExecutor, resolve_executor
from prefixbatch.jobs.spec import JobSpec
from prefixbatch.model_folder import (
    kv_budget_for_memory,
    kv_bytes_per_token,
    read_config,
    weights_bytes,
)
from prefixbatch.prefix_tree import PlannedRequests, PlanSettings, plan_requests
from prefixbatch.types import Request

DEFAULT_CPU_KV_BUDGET = 131_072  # tokens held at once on the CPU (2 GiB of fp32 KV for the `small` model)
CPU_KV_MEMORY_SHARE = 0.5  # of the memory available after the weights, at most, for KV


def resolve_job_executor(spec: JobSpec) -> ResolvedExecutor:
    """What runs the job and the KV budget its plans hold, decided once (before any weights
    load); a `UserError` for an executor not installed or a device this machine lacks."""
    resolved = resolve_executor(spec.model, spec.executor, on_workers=spec.cluster.kind == "dask")
    return replace(resolved, kv_budget_tokens=kv_budget_tokens(spec, resolved))


def with_loaded_cache(resolved: ResolvedExecutor, spec: JobSpec, executor) -> ResolvedExecutor:
    """The budget an engine that sizes its own KV cache (vLLM) holds, read back once it is
    loaded, over the estimate; unless `executor.kv_budget_tokens` set one."""
    if not resolved.kind.sizes_own_cache or spec.executor.kv_budget_tokens is not None:
        return resolved
    return replace(resolved, kv_budget_tokens=executor.kv_cache_tokens)


def plan_settings(spec: JobSpec, resolved: ResolvedExecutor, *, num_shards: int) -> PlanSettings:
    """Every setting that shapes the job's plan, from the spec and its resolved executor."""
    return PlanSettings(
        kv_budget_tokens=resolved.kv_budget_tokens,
        num_shards=num_shards,
        prefix_sharing=spec.executor.prefix_sharing and resolved.kind.shares_prefixes,
    )


def kv_budget_tokens(spec: JobSpec, resolved: ResolvedExecutor) -> int:
    """`executor.kv_budget_tokens`, else vLLM's CPU cache, else sized from free CUDA memory,
    else the CPU default."""
    if spec.executor.kv_budget_tokens is not None:
        return spec.executor.kv_budget_tokens
    on_cpu = resolved.device == "cpu"
    if on_cpu and resolved.name == "vllm":
        return vllm_cpu_cache_tokens(spec, resolved)
    if spec.cluster.kind == "dask":  # a cluster's workers' memories: not seen here
        return DEFAULT_CPU_KV_BUDGET
    if on_cpu:
        return cpu_kv_budget(spec.model.path, resolved.dtype)
    from prefixbatch.executors.device import free_device_bytes, torch_dtype

    return _tokens_in_memory(spec.model.path, torch_dtype(resolved.dtype), free_device_bytes(resolved.device))


def cpu_kv_budget(model_path: str, dtype: str) -> int:
    """KV tokens held at once on the CPU: `DEFAULT_CPU_KV_BUDGET`, or fewer where they would
    take over `CPU_KV_MEMORY_SHARE` of the memory available now once the weights are in (a
    model with a large KV per token: Llama-3.1-8B's 128 KiB a token in bf16 would make the
    default 16 GiB) — then a power of two, so that `plan` and a later `run` on a machine whose
    free memory moved a little still make the same plan."""
    import psutil

    from prefixbatch.executors.device import dtype_name, torch_dtype

    fits = _tokens_in_memory(
        model_path, torch_dtype(dtype_name(dtype, "cpu")), psutil.virtual_memory().available,
        reserve=1.0 - CPU_KV_MEMORY_SHARE,
    )
    return DEFAULT_CPU_KV_BUDGET if fits >= DEFAULT_CPU_KV_BUDGET else 1 << (fits.bit_length() - 1)


def _tokens_in_memory(model_path: str, dtype, free_bytes: int, *, reserve: float = 0.1) -> int:
    """KV tokens of the model in `dtype` that `free_bytes` hold once its weights are in
    (sizes from config.json and the safetensors headers; no weights read)."""
    config = read_config(model_path)
    return kv_budget_for_memory(
        free_bytes=free_bytes,
        weights_bytes=weights_bytes(model_path, config, dtype.itemsize),
        bytes_per_token=kv_bytes_per_token(config, dtype.itemsize),
        reserve=reserve,
    )


def vllm_cpu_cache_tokens(spec: JobSpec, resolved: ResolvedExecutor) -> int:
    """The KV tokens vLLM's CPU engine holds: `executor.vllm.cpu_kv_cache_gib` in whole blocks
    of the model's KV bytes per token (what the engine allocates, and reads back as its size)."""
    from prefixbatch.executors.device import torch_dtype
    from prefixbatch.executors.vllm_engine import block_size_for

    settings = spec.executor.vllm
    block = block_size_for(settings.block_size, "cpu")
    dtype = torch_dtype(resolved.dtype)
    per_token = kv_bytes_per_token(read_config(spec.model.path), dtype.itemsize)
    blocks = settings.cpu_kv_cache_gib * 2**30 // (per_token * block)
    if settings.kv_cache_tokens is not None:
        blocks = settings.kv_cache_tokens // block
    return blocks * block


def plan_job(
    spec: JobSpec, resolved: ResolvedExecutor, requests: Sequence[Request], *, num_shards: int = 1, decode=None
) -> PlannedRequests:
    """The job's plan over `requests` (the rows not committed yet), for the executor `resolved`."""
    return plan_requests(requests, plan_settings(spec, resolved, num_shards=num_shards), decode=decode)


def plan_summary(work: PlannedRequests) -> dict:
    """What the plan predicts, as `plan --json` and `_summary.json` both show it."""
    plan = work.plan
    return {
        "digest": plan.digest(),
        "requests": plan.num_requests,
        "groups": plan.num_groups,
        "shards": plan.num_shards,
        "prefill_tokens": plan.num_prefill_tokens,
        "decode_tokens": plan.num_decode_tokens,
        "peak_kv_tokens": plan.peak_kv_tokens,
        "kv_budget_tokens": plan.kv_budget_tokens,
        "group_budget_tokens": plan.group_budget_tokens,
        "prefix_sharing": plan.prefix_sharing,
    }
