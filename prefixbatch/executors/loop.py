"""The one generate loop: a plan on an executor, each completion into a part writer as it finishes.

Every run calls it: `jobs.run` in one process, `cluster.worker.run_shard` for each Dask
shard. Around the executor's `generate` it keeps a run's promises: every completion goes
to the writer (which writes whole rows as parts) and is counted; an executor that continues
generations (its registry entry `resumes_generations`) has what it holds in flight
checkpointed every `checkpoint_seconds`; and once `stop` is set, the whole rows are written
first and what is still in flight is saved after, so a resumed run loses nothing generated.
Progress display is the caller's: it watches the executor's stats and gets each completion.

in: an executor, its `ResolvedExecutor`, a plan's `PlannedRequests`, a `PartWriter` → out:
`Generated` (what was written).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prefixbatch.executors.base import Executor, StopFlag
from prefixbatch.executors.registry import ResolvedExecutor
from prefixbatch.pipeline.checkpoints import Checkpointer, Checkpoints, Partials
from prefixbatch.pipeline.parts import PartWriter
from prefixbatch.prefix_tree import PlannedRequests
from prefixbatch.types import Completion


@dataclass
class Generated:
    """What one pass of the loop wrote."""

    num_completions: int = 0
    num_output_tokens: int = 0
    num_unused_tokens: int = 0  # max_tokens its rows did not use (stopped early): done work for an ETA
    stopped: bool = False  # `stop` was set: requests of the plan may not have run


def generate_into(
    executor: Executor,
    resolved: ResolvedExecutor,
    work: PlannedRequests,
    writer: PartWriter,
    checkpoints: Checkpoints,
    *,
    checkpoint_seconds: float | None,
    stop: StopFlag | None = None,
    known: Partials | None = None,
    on_completion: Callable[[Completion, int], None] | None = None,
) -> Generated:
    """Run `work` on `executor`, every completion added to `writer`; `known`: an earlier run's
    checkpointed generations that checkpoints keep until they run again; `on_completion`: called
    with each completion and its unused max_tokens (progress)."""
    resumes = resolved.kind.resumes_generations
    saver = Checkpointer(
        executor.in_flight if resumes else dict,  # every executor that resumes has it (`Executor`)
        checkpoints,
        checkpoint_seconds if resumes else None,
        known=known,
        done_rows=writer.committed_rows,
    )
    generated = Generated()
    with saver:
        for completion in executor.generate(work, stop=stop):
            unused = work.unused_tokens(completion)
            writer.add(completion)
            generated.num_completions += 1
            generated.num_output_tokens += completion.num_output_tokens
            generated.num_unused_tokens += unused
            if on_completion is not None:
                on_completion(completion, unused)
        generated.stopped = stop is not None and stop.is_set()
        if generated.stopped:
            writer.flush()  # the whole rows first (a driver's writer commits them), then the rest saved
            saver.save()
    return generated


__all__ = ["Generated", "generate_into"]
