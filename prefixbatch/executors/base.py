"""The executor contract, and the one place that maps `executor.kind` to a class.

An executor receives requests (token ids + sampling) and yields one `Completion` per
request, in any order, as soon as each is done, so callers can show progress and write
output incrementally. Executor modules are imported only when chosen: torch is heavy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.types import Completion, Request


class Executor(Protocol):
    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        """One completion per request, yielded as they finish."""
        ...


def create_executor(model: ModelSpec, executor: ExecutorSpec) -> Executor:
    """Load the model for the chosen executor kind."""
    if executor.kind == "hf":
        from prefixbatch.executors.hf import HfExecutor

        return HfExecutor(model, executor)
    msg = f"executor.kind must be one of ['hf'], got {executor.kind!r}"  # unreachable: the spec validates it
    raise ValueError(msg)
