"""The executor contract: a plan in, completions out, and what was computed.

An executor is handed a `PlannedRequests` (a plan, or one shard's part of it, with the
requests and tokens it indexes) and yields one `Completion` per request, in any order, as
soon as each is done, so callers can show progress and write output incrementally. It runs
the plan's groups in the plan's order and never plans on its own. `registry` says which
executors exist and loads the chosen one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from prefixbatch.prefix_tree import PlannedRequests
from prefixbatch.types import Completion


@dataclass
class ExecutorStats:
    """What an executor computed; the run summary reports it beside the plan's prediction."""

    num_prefill_tokens: int = 0  # prompt tokens whose KV was computed (shared prefixes once, natively)
    num_decode_tokens: int = 0  # generated tokens fed back through the model
    num_steps: int = 0  # forward passes
    peak_kv_tokens: int = 0  # most KV-cache tokens held at once (native)
    num_groups: int = 0  # plan groups run

    def copy(self) -> ExecutorStats:
        return ExecutorStats(**vars(self))

    def since(self, before: ExecutorStats) -> ExecutorStats:
        """The work done after `before` (a copy taken then); the peak is the peak so far."""
        delta = ExecutorStats(**{k: v - getattr(before, k) for k, v in vars(self).items()})
        delta.peak_kv_tokens = self.peak_kv_tokens
        return delta


class StopFlag(Protocol):
    """Set when the run must stop (a signal, the user): a `threading.Event` is one."""

    def is_set(self) -> bool: ...


class Executor(Protocol):
    """Built as `Class(model, executor, resolved)`. What an executor can do beyond this is
    said by its registry entry, never found by `hasattr`: one that `resumes_generations` also
    has `in_flight()` ((row, sample) → tokens so far), one that `sizes_own_cache` has
    `kv_cache_tokens`."""

    kind: str  # the registry's name for it
    stats: ExecutorStats

    def generate(self, work: PlannedRequests, *, stop: StopFlag | None = None) -> Iterator[Completion]:
        """One completion per request of `work`, yielded as they finish. Once `stop` is set
        it returns within a step or a batch, yielding no completion it has not finished."""
        ...


@dataclass
class Executed:
    """What ran in a job: the executor kind and its work, summed over shards on a cluster."""

    kind: str
    stats: ExecutorStats = field(default_factory=ExecutorStats)
    shards: list = field(default_factory=list)  # cluster: one `ShardResult` per shard run

    def add(self, shard: Any) -> None:
        """A shard's result: its work added (peak KV: the largest), the shard listed."""
        self.shards.append(shard)
        for key, value in vars(shard.stats).items():
            if key == "peak_kv_tokens":
                self.stats.peak_kv_tokens = max(self.stats.peak_kv_tokens, value)
            else:
                setattr(self.stats, key, getattr(self.stats, key) + value)


__all__ = ["Executed", "Executor", "ExecutorStats", "StopFlag"]
