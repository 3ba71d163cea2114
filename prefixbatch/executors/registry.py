"""Which executors exist, what each can do, and loading the chosen one.

A table, not an if/else: each entry names its class as "module:Class", imported only when
chosen (torch and transformers are heavy), so nothing here imports an executor and no
executor imports this module. `shares_prefixes` tells the planner whether the executor can
reuse a shared prefix's KV; one that cannot is planned without sharing, so the plan predicts
exactly what it computes. `resumes_generations`: whether runs checkpoint its generations in
flight and continue them on resume (an executor that cannot restarts such rows).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from prefixbatch.config import ModelSpec
from prefixbatch.errors import ModelError, UserError
from prefixbatch.executors.base import Executor
from prefixbatch.executors.config import ExecutorSpec
from prefixbatch.executors.memory import keep_freed_memory


@dataclass(frozen=True)
class ExecutorKind:
    name: str
    target: str  # "module:Class"
    shares_prefixes: bool
    # continues a generation from an earlier run's tokens (`Request.num_generated`) and tells
    # what is in flight (`in_flight()`), so runs checkpoint and resume mid-generation
    resumes_generations: bool
    needs: str | None = None  # a package that is not a dependency, as "module:install hint"


EXECUTORS = {
    "native": ExecutorKind("native", "prefixbatch.executors.native.executor:NativeExecutor", True, True),
    "hf": ExecutorKind("hf", "prefixbatch.executors.hf:HfExecutor", False, False),
    "vllm": ExecutorKind(
        "vllm", "prefixbatch.executors.vllm_engine:VllmExecutor", True, True, needs="vllm:INSTALL_HINT"
    ),
}


def resolve_kind(model: ModelSpec, executor: ExecutorSpec) -> str:
    """`executor.kind`, with `auto` as `native` when our engine implements the model, else `hf`."""
    if executor.kind != "auto":
        return executor.kind
    from prefixbatch.executors.native.config import model_config_from_hf
    from prefixbatch.model_folder import read_config

    try:
        model_config_from_hf(read_config(model.path))
    except ModelError:
        return "hf"
    return "native"


def check_available(model: ModelSpec, executor: ExecutorSpec) -> None:
    """The chosen executor's extra package is installed, else a `UserError` saying how to
    install it (at `validate`, and before a run writes anything)."""
    kind = EXECUTORS[resolve_kind(model, executor)]
    if kind.needs is None:
        return
    package, hint = kind.needs.split(":")
    if importlib.util.find_spec(package) is None:
        module = importlib.import_module(kind.target.split(":")[0])
        raise UserError(getattr(module, hint))


def check_device(executor: ExecutorSpec) -> str:
    """The device `executor.device` resolves to here ("cpu" / "cuda"); a `UserError` for
    `cuda` on a machine without one (at `validate`, and before a run writes anything)."""
    from prefixbatch.executors.device import resolve_device  # torch: only once a job is checked

    return resolve_device(executor.device).type


def create_executor(model: ModelSpec, executor: ExecutorSpec) -> Executor:
    """Load the model for the chosen executor kind."""
    kind = EXECUTORS[resolve_kind(model, executor)]
    keep_freed_memory()
    module, name = kind.target.split(":")
    return getattr(importlib.import_module(module), name)(model, executor)


__all__ = ["EXECUTORS", "ExecutorKind", "check_available", "check_device", "create_executor", "resolve_kind"]
