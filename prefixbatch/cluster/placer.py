"""Which worker runs which shard, what a worker's death means, and how long to wait for one.

`Placer.run` hands each shard task to a worker with a free thread, and never has more out
than threads: a worker never holds a shard queued behind the one it runs, so when a worker
dies the shard that failed with it was running there, and each death counts against that
shard alone. A shard that has caused `max_attempts` deaths is split in halves; a single row
that has is a `worker_crash` error row. Only the driver retries (Dask's own retries are off
for a LocalCluster the run starts; a running cluster's `allowed-failures` still applies
before the driver's).

Every wait is bounded: a shard out on a worker that has left the scheduler's list for
`LOST_AFTER_S` counts as that worker's death (Dask may never fail such a future), and a
run in which no worker could take a shard for `cluster.worker_wait_s` stops with a
`UserError` (what was committed is kept for `--resume`) instead of waiting forever.

in: shard tasks → committed parts (through `OutputFolder`), work summed into `Executed`.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from typing import Any

from prefixbatch.cluster.config import ClusterJob, ClusterSpec, Progress
from prefixbatch.cluster.worker import CRASH_MESSAGE, ShardTask
from prefixbatch.errors import UserError
from prefixbatch.executors.base import Executed, StopFlag
from prefixbatch.pipeline.commits import OutputFolder
from prefixbatch.pipeline.parts import PartWriter
from prefixbatch.types import error_completion

STOP_WAIT_S = 8.0  # a graceful stop waits this long for running shards to hand back their rows
STOP_CHECK_S = 0.5  # how soon the driver notices a stop, a free worker thread, and workers alive
LOST_AFTER_S = 5.0  # a worker gone from the scheduler's list this long is dead, not reconnecting
NO_WORKER_POLL_S = 0.2  # how often the driver looks for a worker while none can take a shard


class Placer:
    """Runs one list of shard tasks on the cluster; see the module docstring."""

    def __init__(self, client, spec: ClusterJob, progress: Progress, log, stop: StopFlag | None = None,
                 stop_event: str = "") -> None:
        self.client, self.spec, self.progress, self.log, self.stop = client, spec, progress, log, stop
        self.stop_event = stop_event
        self.resources = spec.cluster.resources or None
        self.out: dict[Any, tuple[Any, str | None]] = {}  # future → (task, worker it was given to)
        self.deaths: dict[str, int] = {}  # shard id → worker deaths it caused
        self.missing_since: dict[str, float] = {}  # future key → when its worker left the list
        self.no_worker = WorkerClock(spec.cluster)
        self.stopping_since: float | None = None

    def run(self, tasks: list, output: OutputFolder, writer: PartWriter, result: Executed) -> None:
        waiting = deque(tasks)
        while waiting or self.out:
            if self._stop_requested():
                waiting.clear()
            if self.stopping_since is not None and (not self.out or time.monotonic() - self.stopping_since > STOP_WAIT_S):
                self.client.cancel(list(self.out))
                return
            workers = self.client.scheduler_info()["workers"]
            self._requeue(waiting, self._lost(workers, writer))
            self._place(waiting, workers)
            if not self.out:  # no worker can take a shard (restarting after a death, or gone)
                self.no_worker.tick()
                time.sleep(NO_WORKER_POLL_S)
                continue
            self.no_worker.reset()
            for future in _first_done(list(self.out)):
                task, _ = self.out.pop(future)
                self._requeue(waiting, self._finished(future, task, output, writer, result))

    def _stop_requested(self) -> bool:
        """True the first time the run's stop flag is seen set: the running shards are told
        to stop within a step, checkpoint what is in flight and return their whole rows."""
        from distributed import Event

        if self.stopping_since is not None or self.stop is None or not self.stop.is_set():
            return False
        self.stopping_since = time.monotonic()
        Event(self.stop_event, client=self.client).set()
        return True

    def _requeue(self, waiting: deque, again: list) -> None:
        if self.stopping_since is None:  # a stopping run starts nothing more
            waiting.extendleft(reversed(again))

    def _place(self, waiting: deque, workers: dict[str, dict]) -> None:
        if self.stopping_since is not None:
            return
        free = self._free_threads(workers)
        while waiting and free:
            self._submit(waiting.popleft(), free.pop(0))

    def _free_threads(self, workers: dict[str, dict]) -> list[str]:
        """A worker address per free thread of the usable workers, least busy first."""
        self.progress.set_workers(len(workers))
        busy = Counter(where for _, where in self.out.values())
        running = {a: w for a, w in workers.items() if w.get("status", "running") == "running"}
        usable = usable_worker_addresses(self.spec.cluster, running, strict=False)
        slots = {a: max(_capacity(self.spec.cluster, running[a]) - busy[a], 0) for a in usable}
        return [a for a in sorted(slots, key=lambda a: -slots[a]) for _ in range(slots[a])]

    def _submit(self, task, where: str | None) -> None:
        key = f"shard-{task.shard_id}-{os.urandom(4).hex()}"  # a fresh key per attempt
        function, args = task.call()
        future = self.client.submit(
            function, *args, key=key, pure=False, resources=self.resources,
            workers=[where] if where else None, allow_other_workers=where is not None,
        )
        self.out[future] = (task, where)

    def _lost(self, workers: dict[str, dict], writer: PartWriter) -> list:
        """What to run instead of the shards whose worker has been gone from the scheduler's
        list for `LOST_AFTER_S` and that no other worker runs: each such future is cancelled
        and counts as its worker's death."""
        missing = [f for f, (_, where) in self.out.items() if where is not None and where not in workers and not f.done()]
        self.missing_since = {f.key: self.missing_since.get(f.key, time.monotonic()) for f in missing}
        overdue = [f for f in missing if time.monotonic() - self.missing_since[f.key] > LOST_AFTER_S]
        if not overdue:
            return []
        # A running cluster's own retries (`allowed-failures`) may have moved a shard on.
        moved = {key: where for where, keys in self.client.processing().items() for key in keys}
        again = []
        for future in overdue:
            task, _ = self.out[future]
            if future.key in moved:
                self.out[future] = (task, moved[future.key])
                continue
            self.client.cancel([future])
            del self.out[future]
            again += self._died(future.key, task, writer, "its worker left the cluster")
        return again

    def _finished(self, future, task, output: OutputFolder, writer: PartWriter, result: Executed) -> list:
        """Commit a shard's result; or, when its worker died, what to run instead."""
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        try:
            shard = future.result()
        except (KilledWorker, FutureCancelledError) as exc:
            return self._died(future.key, task, writer, type(exc).__name__)
        for record in shard.records:
            output.commit(record)
        result.add(shard)
        self.progress.advance(
            shard.num_requests, shard.output_tokens, settles=future.key,
            prefill_tokens=shard.stats.num_prefill_tokens, unused_tokens=shard.unused_tokens,
        )
        return []

    def _died(self, key: str, task, writer: PartWriter, why: str) -> list:
        """The worker running `task` died: run it again, in halves, or (one row that has
        killed `max_attempts` workers) as a `worker_crash` error row."""
        self.progress.settle(key)
        deaths = self.deaths[task.shard_id] = self.deaths.get(task.shard_id, 0) + 1
        if deaths < self.spec.cluster.max_attempts:
            self.log(f"dask: the worker running shard {task.shard_id} died ({why}); running it again")
            return [task]
        if task.num_rows > 1:
            self.log(f"dask: shard {task.shard_id} killed {deaths} workers; running it again in halves")
            return task.split()
        if isinstance(task, ShardTask):
            _crash_rows(task, writer, self.progress)
            return []
        return [task.as_crashed()]  # the row's columns are on the workers: one of them writes it


class WorkerClock:
    """How long no worker could take a task; past `cluster.worker_wait_s`, a `UserError`."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.since: float | None = None  # when the wait for a worker began; None: not waiting

    def tick(self) -> None:
        """Still no worker: raise once the wait has lasted `worker_wait_s`."""
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since > self.spec.worker_wait_s:
            raise no_worker_error(self.spec, now - self.since)

    def reset(self) -> None:
        self.since = None


def no_worker_error(spec: ClusterSpec, waited_s: float) -> UserError:
    """Why the run stops: where it looked for workers, for how long, and how to go on."""
    where = f"the Dask scheduler at {spec.address}" if spec.address else f"the local cluster (cluster.local_workers {spec.local_workers})"
    need = f" with {_resources_text(spec.resources)}" if spec.resources else ""
    return UserError(
        f"no worker{need} of {where} could take a task for {waited_s:.0f} s (cluster.worker_wait_s"
        f" {spec.worker_wait_s:g}): its workers died or left and none came back; the rows committed"
        " so far are kept: run the same command with --resume to finish the job"
    )


def usable_worker_addresses(spec: ClusterSpec, workers: dict[str, dict], *, strict: bool = True) -> list[str]:
    """The workers that can run a shard (have `cluster.resources`); none (`strict`) is a user
    error, not a job that waits forever."""
    need = spec.resources
    usable = [a for a, w in workers.items() if all(w.get("resources", {}).get(k, 0) >= v for k, v in need.items())]
    if strict and need and not usable:
        where = spec.address or "the local cluster"
        have = sorted({_resources_text(w.get("resources") or {}) for w in workers.values()}) or ["no workers"]
        raise UserError(
            f"cluster.resources {_resources_text(need)}: no worker of {where} has them (workers have: "
            f"{'; '.join(have)}); start the workers with `--resources`, or change cluster.resources"
        )
    return sorted(usable)


def as_finished(client, spec: ClusterSpec, futures: list):
    """Each future as it finishes (`distributed.as_completed`'s order), but a wait during which
    no worker that could run them is up stops after `cluster.worker_wait_s` (`WorkerClock`)."""
    pending, no_worker = set(futures), WorkerClock(spec)
    while pending:
        with client.as_current():  # for `distributed.wait` in this thread
            done = _first_done(list(pending))
        pending -= done
        yield from done
        running = {a: w for a, w in client.scheduler_info()["workers"].items() if w.get("status", "running") == "running"}
        if usable_worker_addresses(spec, running, strict=False):
            no_worker.reset()
        else:
            no_worker.tick()


def _first_done(futures: list) -> set:
    """The futures done within `STOP_CHECK_S` (none: the caller looks at the cluster again)."""
    from distributed import wait

    try:
        return wait(futures, timeout=STOP_CHECK_S, return_when="FIRST_COMPLETED").done
    except TimeoutError:
        return set()


def _capacity(spec: ClusterSpec, worker: dict) -> int:
    """Shards a worker runs at once: its threads, and no more than its resources allow."""
    have = worker.get("resources") or {}
    return min([int(worker.get("nthreads", 1))] + [int(have.get(k, 0) // v) for k, v in spec.resources.items() if v > 0])


def _resources_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "none"


def _crash_rows(task: ShardTask, writer: PartWriter, progress: Progress) -> None:
    """The row of a one-row shard that killed every worker it ran on: an error row, committed."""
    [row] = {r.row_index for r in task.requests}
    tokens = len(task.requests[0].token_ids)
    writer.add_in_place_of_row(error_completion(row, "worker_crash", CRASH_MESSAGE, num_prompt_tokens=tokens))
    writer.flush()
    progress.advance(len(task.requests), 0, unused_tokens=sum(r.sampling.max_tokens for r in task.requests))


__all__ = ["Placer", "WorkerClock", "as_finished", "no_worker_error", "usable_worker_addresses"]
