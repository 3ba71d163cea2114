"""Which executors exist, what each can do, the one a job runs on (resolved once), and loading it.

A table, not an if/else: each entry names its class as "module:Class", imported only when
chosen (torch and transformers are heavy), so nothing here imports an executor. What an
entry says it can do is the only place callers learn it (never `hasattr` on an executor):
`shares_prefixes` tells the planner whether the executor can reuse a shared prefix's KV (one
that cannot is planned without sharing, so the plan predicts exactly what it computes);
`resumes_generations` whether runs checkpoint its generations in flight and continue them
on resume; `sizes_own_cache` whether the engine decides its KV cache's size itself and
reports it once loaded.

`resolve_executor` turns the spec's `auto`s into a `ResolvedExecutor` (kind, device, dtype;
the job layer adds the KV budget) once, where a job is loaded, and that plain value is
handed down: to planning, to the run, to the executor's constructor, pickled to Dask
workers. `auto` picks `native` when our engine implements the model, else `hf`; on CUDA,
until the native CUDA path is measured (`CUDA_PATH_MEASURED`), `vllm` when it is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, replace

from prefixbatch.config import ModelSpec
from prefixbatch.errors import ModelError, UserError
from prefixbatch.executors.base import Executor
from prefixbatch.executors.config import ExecutorSpec
from prefixbatch.executors.memory import keep_freed_memory

log = logging.getLogger(__name__)

# `native` on CUDA has never run on a GPU here (issue 31): `auto` does not bet a GPU job on
# it while vLLM is at hand. Flip to True once a GPU check's results are in BENCHMARKS.md.
CUDA_PATH_MEASURED = False
UNMEASURED_CUDA = (
    "executor.kind auto chose native on CUDA, whose CUDA path is unmeasured (no GPU check has run "
    "yet); install vLLM (pip install 'prefixbatch[vllm]') to have auto choose it, or set executor.kind"
)


@dataclass(frozen=True)
class ExecutorKind:
    name: str
    target: str  # "module:Class"
    shares_prefixes: bool
    # continues a generation from an earlier run's tokens (`Request.num_generated`) and tells
    # what is in flight (`in_flight()`), so runs checkpoint and resume mid-generation
    resumes_generations: bool
    # sizes its KV cache itself and reads it back once loaded (`kv_cache_tokens`): the plan's budget
    sizes_own_cache: bool = False
    needs: str | None = None  # a package that is not a dependency, as "module:install hint"


EXECUTORS = {
    "native": ExecutorKind("native", "prefixbatch.executors.native.executor:NativeExecutor", True, True),
    "hf": ExecutorKind("hf", "prefixbatch.executors.hf:HfExecutor", False, False),
    "vllm": ExecutorKind(
        "vllm", "prefixbatch.executors.vllm_engine:VllmExecutor", True, True, sizes_own_cache=True,
        needs="vllm:INSTALL_HINT",
    ),
}


@dataclass(frozen=True)
class ResolvedExecutor:
    """What a job's `executor` section and `model.dtype` come to, decided once: plain data."""

    kind: ExecutorKind  # the registry's entry: its name, its class, what it can do
    # "cpu" | "cuda". A Dask driver's is its own view (the setting, or what `auto` finds on
    # the driver); each worker resolves the device it runs on (`on_worker`).
    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    kv_budget_tokens: int | None = None  # KV tokens a plan may hold at once: set by the job layer

    @property
    def name(self) -> str:
        return self.kind.name

    def on_worker(self, model: ModelSpec, executor: ExecutorSpec) -> ResolvedExecutor:
        """On a Dask worker: the same kind and budget, the device and dtype this machine has
        (a `cuda` it lacks is a `UserError` here)."""
        return replace(resolve_executor(model, executor, kind=self.name), kv_budget_tokens=self.kv_budget_tokens)


def resolve_executor(
    model: ModelSpec, executor: ExecutorSpec, *, kind: str | None = None, on_workers: bool = False
) -> ResolvedExecutor:
    """The executor kind, device and dtype the settings come to on this machine; a `UserError`
    for an executor that is not installed or a `cuda` device this machine lacks.

    `kind`: an executor built by name (tests, benchmarks), no choice made. `on_workers`: a
    Dask job's driver, which checks no device (the workers' business) and chooses with its
    own view of `auto`.
    """
    # torch: imported only once a job is loaded
    from prefixbatch.executors.device import dtype_name, resolve_device

    if on_workers and executor.device != "auto":
        device = executor.device
    else:
        device = resolve_device(executor.device).type
    entry = EXECUTORS[kind or _choose_kind(model, executor, device)]
    _check_installed(entry)
    return ResolvedExecutor(entry, device, dtype_name(model.dtype, device))


def _choose_kind(model: ModelSpec, executor: ExecutorSpec, device: str) -> str:
    """`executor.kind`, with `auto` resolved (see the module docstring)."""
    if executor.kind != "auto":
        return executor.kind
    unmeasured = device == "cuda" and not CUDA_PATH_MEASURED
    # A native-only setting asked for (batch-invariant numerics) keeps native, whose own check
    # then says where it runs: vLLM would ignore it.
    if unmeasured and not executor.native.batch_invariant and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    kind = "native" if _native_implements(model) else "hf"
    if kind == "native" and unmeasured:
        log.warning(UNMEASURED_CUDA)
    return kind


def _native_implements(model: ModelSpec) -> bool:
    from prefixbatch.executors.native.config import model_config_from_hf
    from prefixbatch.model_folder import read_config

    try:
        model_config_from_hf(read_config(model.path))
    except ModelError:
        return False
    return True


def _check_installed(kind: ExecutorKind) -> None:
    """The kind's extra package is installed, else a `UserError` saying how to install it."""
    if kind.needs is None:
        return
    package, hint = kind.needs.split(":")
    if importlib.util.find_spec(package) is None:
        module = importlib.import_module(kind.target.split(":")[0])
        raise UserError(getattr(module, hint))


def create_executor(model: ModelSpec, executor: ExecutorSpec, resolved: ResolvedExecutor | None = None) -> Executor:
    """Load the model on the resolved executor (resolved here when none is handed: scripts)."""
    resolved = resolved or resolve_executor(model, executor)
    keep_freed_memory()
    module, name = resolved.kind.target.split(":")
    return getattr(importlib.import_module(module), name)(model, executor, resolved)


__all__ = [
    "CUDA_PATH_MEASURED",
    "EXECUTORS",
    "ExecutorKind",
    "ResolvedExecutor",
    "create_executor",
    "resolve_executor",
]
