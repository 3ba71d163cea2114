"""The one place a job's plan is made: settings resolved once, then `plan_requests`.

`prefixbatch plan` and `prefixbatch run` both call `plan_job`, so the plan a user previews
is the plan the run executes: same settings, same digest. Every setting that shapes it is
resolved here, with its one default:

- the KV budget: `executor.kv_budget_tokens`, else on CUDA what free device memory holds
  after the weights (bytes per KV token from the model's config.json; no weights loaded),
  else on the CPU `DEFAULT_CPU_KV_BUDGET` or what half the memory available after the weights
  holds, whichever is less (a model with a large KV per token); a group may take
  `GROUP_SHARE` of it;
- prefix sharing: `executor.prefix_sharing`, and off for an executor that cannot share
  (`hf`), so the plan predicts exactly what that executor computes;
- shards: 1 in one process; on Dask, workers × `cluster.shards_per_worker`.

in: the spec + the requests to run → out: `PlannedRequests`, and its summary for reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from prefixbatch.executors.registry import EXECUTORS, resolve_kind
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


def plan_settings(spec: JobSpec, *, num_shards: int) -> PlanSettings:
    """Every setting that shapes the job's plan, resolved from the spec and the machine."""
    kind = resolve_kind(spec.model, spec.executor)
    return PlanSettings(
        kv_budget_tokens=kv_budget_tokens(spec),
        num_shards=num_shards,
        prefix_sharing=spec.executor.prefix_sharing and EXECUTORS[kind].shares_prefixes,
    )


def kv_budget_tokens(spec: JobSpec) -> int:
    """`executor.kv_budget_tokens`, else vLLM's CPU cache, else sized from free CUDA memory,
    else the CPU default."""
    if spec.executor.kv_budget_tokens is not None:
        return spec.executor.kv_budget_tokens
    from prefixbatch.executors.device import free_device_bytes, resolve_device, resolve_dtype

    on_cpu = spec.executor.device == "cpu" or (
        spec.executor.device == "auto" and resolve_device("auto").type == "cpu"
    )
    if on_cpu and resolve_kind(spec.model, spec.executor) == "vllm":
        return vllm_cpu_cache_tokens(spec)
    if spec.cluster.kind == "dask":  # a cluster's workers' memories: not seen here
        return DEFAULT_CPU_KV_BUDGET
    if on_cpu:
        return cpu_kv_budget(spec.model.path, spec.model.dtype)
    device = resolve_device(spec.executor.device)
    return _tokens_in_memory(spec.model.path, resolve_dtype(spec.model.dtype, device), free_device_bytes(device))


def cpu_kv_budget(model_path: str, dtype_name: str) -> int:
    """KV tokens held at once on the CPU: `DEFAULT_CPU_KV_BUDGET`, or fewer where they would
    take over `CPU_KV_MEMORY_SHARE` of the memory available now once the weights are in (a
    model with a large KV per token: Llama-3.1-8B's 128 KiB a token in bf16 would make the
    default 16 GiB) — then a power of two, so that `plan` and a later `run` on a machine whose
    free memory moved a little still make the same plan."""
    import psutil

    from prefixbatch.executors.device import resolve_device, resolve_dtype

    dtype = resolve_dtype(dtype_name, resolve_device("cpu"))
    fits = _tokens_in_memory(
        model_path, dtype, psutil.virtual_memory().available, reserve=1.0 - CPU_KV_MEMORY_SHARE
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


def vllm_cpu_cache_tokens(spec: JobSpec) -> int:
    """The KV tokens vLLM's CPU engine holds: `executor.vllm.cpu_kv_cache_gib` in whole blocks
    of the model's KV bytes per token (what the engine allocates, and reads back as its size)."""
    from prefixbatch.executors.device import resolve_device, resolve_dtype
    from prefixbatch.executors.vllm_engine import block_size_for

    settings = spec.executor.vllm
    block = block_size_for(settings.block_size, "cpu")
    dtype = resolve_dtype(spec.model.dtype, resolve_device("cpu"))
    per_token = kv_bytes_per_token(read_config(spec.model.path), dtype.itemsize)
    blocks = settings.cpu_kv_cache_gib * 2**30 // (per_token * block)
    if settings.kv_cache_tokens is not None:
        blocks = settings.kv_cache_tokens // block
    return blocks * block


def plan_job(
    spec: JobSpec, requests: Sequence[Request], *, num_shards: int = 1, decode=None, kv_budget_tokens: int | None = None
) -> PlannedRequests:
    """The job's plan over `requests` (the rows not committed yet); `kv_budget_tokens`: an
    executor's own cache size, read back once it started (vLLM), over the spec's."""
    settings = plan_settings(spec, num_shards=num_shards)
    if kv_budget_tokens is not None and spec.executor.kv_budget_tokens is None:
        settings = replace(settings, kv_budget_tokens=kv_budget_tokens)
    return plan_requests(requests, settings, decode=decode)


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
