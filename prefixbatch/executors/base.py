"""The executor contract, and the one place that maps `executor.kind` to a class.

An executor receives requests (token ids + sampling) and yields one `Completion` per
request, in any order, as soon as each is done, so callers can show progress and write
output incrementally. Executor modules are imported only when chosen: torch is heavy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.memory import keep_freed_memory
from prefixbatch.types import Completion, Request


@dataclass
class ExecutorStats:
    """What an executor computed; the run summary reports it."""

    num_prefill_tokens: int = 0  # prompt tokens whose KV was computed (shared prefixes once, natively)
    num_decode_tokens: int = 0  # generated tokens fed back through the model
    num_steps: int = 0  # forward passes
    peak_kv_tokens: int = 0  # most KV-cache tokens held at once (native)


class Executor(Protocol):
    stats: ExecutorStats

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        """One completion per request, yielded as they finish."""
        ...


def resolve_kind(model: ModelSpec, executor: ExecutorSpec) -> str:
    """`native` or `hf`; `auto` is `native` when our engine implements the model's architecture."""
    if executor.kind != "auto":
        return executor.kind
    from prefixbatch.errors import ModelError
    from prefixbatch.executors.model_folder import read_config
    from prefixbatch.executors.native.config import model_config_from_hf

    try:
        model_config_from_hf(read_config(model.path))
    except ModelError:
        return "hf"
    return "native"


def create_executor(model: ModelSpec, executor: ExecutorSpec) -> Executor:
    """Load the model for the chosen executor kind."""
    kind = resolve_kind(model, executor)
    keep_freed_memory()
    if kind == "native":
        from prefixbatch.executors.native.executor import NativeExecutor

        return NativeExecutor(model, executor)
    from prefixbatch.executors.hf import HfExecutor

    return HfExecutor(model, executor)
