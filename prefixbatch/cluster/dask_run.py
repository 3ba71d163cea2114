"""A job's generation on a Dask cluster, in shards cut along the global prefix tree.

The driver has read, tokenized and planned the job for `num_shards()` shards (or, with
`cluster.plan_on: workers`, partitioned it: `partition.py`). The plan's shards are cut
along subtree boundaries (each shared prefix on one worker where possible, balanced by
estimated cost, `shards_per_worker` per worker so a slow or lost worker costs little, a
row's samples never apart); each shard's part of the plan goes to a worker with a free
thread (`_Placer`), which runs it as given (`worker.py`). Only the driver commits, each
shard's records once. The cluster code reads the sub-specs it needs (`ClusterJob`) and
reports through a `Progress`, never the job layer's objects.

Failures: when a worker dies, the shard it was running runs again elsewhere. A shard whose
workers died `max_attempts` times is split in two and both halves run again, down to the
single row that kills workers, which becomes a `worker_crash` error row. Exactly once holds
because only the driver commits, and it commits a shard's rows only from the one result it
accepts.

in: the plan of the requests no commit covers → committed parts; out: `Executed` (work summed over shards).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import dask
import numpy as np

from prefixbatch.cluster.config import ClusterJob, ClusterSpec, Progress
from prefixbatch.cluster.worker import CRASH_MESSAGE, PLUGIN_NAME, EnginePlugin, ShardTask
from prefixbatch.errors import UserError
from prefixbatch.executors.base import Executed, StopFlag
from prefixbatch.executors.registry import resolve_kind
from prefixbatch.pipeline.checkpoints import Partials
from prefixbatch.pipeline.commits import OutputFolder
from prefixbatch.pipeline.parts import PartWriter, RowColumns
from prefixbatch.pipeline.prepare import PreparedInput
from prefixbatch.prefix_tree import PlannedRequests, PlanSettings
from prefixbatch.types import error_completion

STOP_WAIT_S = 8.0  # a graceful stop waits this long for running shards to hand back their rows
STOP_CHECK_S = 0.5  # how soon the driver notices a stop, a free worker thread, and workers alive


class DaskSession:
    """The spec's cluster for one run: connected (or, for `local_workers`, started) and told
    to load the engine in the background while the driver reads, tokenizes and plans.

    `with DaskSession(spec) as cluster: ... cluster.run(...)`. Connecting happens in a
    thread, so a LocalCluster's start-up overlaps the driver's reading too.
    """

    def __init__(self, spec: ClusterJob) -> None:
        self.spec = spec
        self._stack = ExitStack()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefixbatch-dask-connect")
        self._client: Future | None = None

    def __enter__(self) -> DaskSession:
        self._client = self._pool.submit(self._connect)
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)
        self._stack.close()

    def _connect(self):
        from distributed import Client, LocalCluster

        spec = self.spec.cluster
        # The driver retries shards itself (`_Placer`): a death fails the shard at once.
        settings = {"distributed.scheduler.allowed-failures": 0}
        self._stack.enter_context(dask.config.set(settings))
        # Closed by callbacks, not as context managers: they are made in this thread and
        # closed in the caller's (a Client's context holds a context variable of its thread).
        if spec.address is not None:
            try:
                client = Client(spec.address, timeout=spec.connect_timeout_s, set_as_default=False)
            except (OSError, ValueError) as exc:  # refused, timed out, or not an address
                raise UserError(f"cluster.address {spec.address}: cannot reach the Dask scheduler ({exc})") from exc
        else:
            cluster = LocalCluster(
                n_workers=spec.local_workers,
                threads_per_worker=spec.threads_per_worker,
                processes=True,
                resources=spec.resources or None,
                dashboard_address=None,
                # The driver reports every failure itself (one message); the workers' own
                # logs would repeat it with their tracebacks on the user's terminal.
                silence_logs=logging.CRITICAL,
            )
            self._stack.callback(cluster.close)
            client = Client(cluster, set_as_default=False)
        self._stack.callback(client.close)
        plugin = EnginePlugin(self.spec.model.model_dump(), self.spec.executor.model_dump())
        client.register_plugin(plugin, name=PLUGIN_NAME)
        return client

    @property
    def client(self):
        """The connected client; waits for the connection (raises its error)."""
        return self._client.result()

    def num_shards(self) -> int:
        """Shards the job's plan is cut into: workers × `cluster.shards_per_worker`."""
        return count_shards(self.spec.cluster, self.client)

    def run(self, work: PlannedRequests, todo: PreparedInput, output: OutputFolder, writer: PartWriter,
            progress: Progress, *, log, stop: StopFlag | None = None) -> Executed:
        return run_on_dask(self.spec, self.client, work, todo, output, writer, progress, log=log, stop=stop)

    def tokenize_on_workers(self, files: list, committed: np.ndarray, progress: Progress) -> tuple[list, list]:
        """One task per input file: read and tokenize it on a worker (kept there); the
        futures of the file chunks and, fetched, their partition keys."""
        from distributed import as_completed

        from prefixbatch.cluster.partition import chunk_keys, tokenize_file

        client = self.client
        chunks, key_futures = [], {}
        for k, file in enumerate(files):
            first, end = np.searchsorted(committed, [file.first_row_index, file.first_row_index + file.num_rows])
            chunk = client.submit(tokenize_file, self.spec, files, k, committed[first:end], pure=False)
            chunks.append(chunk)
            key_futures[client.submit(chunk_keys, chunk, pure=False)] = k
        keys: list = [None] * len(files)
        for future in as_completed(list(key_futures), loop=client.loop):
            k = key_futures[future]
            keys[k] = future.result()
            progress.advance(files[k].num_rows, 0)
        return chunks, keys

    def run_partitions(self, files: list, chunks: list, keys: list, settings: PlanSettings, output: OutputFolder,
                       writer: PartWriter, progress: Progress, *, log, stop: StopFlag | None = None,
                       partials: Partials | None = None) -> Executed:
        """The prompts range-partitioned by leading tokens, each partition a shard; `partials`:
        checkpointed generations, each handed to the partition of its row."""
        from prefixbatch.cluster.partition import PartitionTask, partition_rows

        spec, client = self.spec, self.client
        result = Executed(resolve_kind(spec.model, spec.executor))
        workers = _usable_worker_addresses(spec.cluster, client.scheduler_info()["workers"])
        partitions = partition_rows(keys, max(len(workers), 1) * spec.cluster.shards_per_worker)
        log(f"dask: {len(workers)} workers, {len(partitions)} partitions planned on the workers")
        shard_fields = _shard_fields(spec, writer)
        starts = np.array([f.first_row_index for f in files])
        tasks = []
        for p, rows in enumerate(partitions):
            holding = np.unique(np.searchsorted(starts, rows, side="right") - 1)  # files with its rows
            # Placed on free workers like shards (left alone, Dask would run every partition
            # where the file chunks are: one worker for a one-file input).
            mine = set(rows.tolist())
            its = {key: tokens for key, tokens in (partials or {}).items() if key[0] in mine}
            tasks.append(PartitionTask(str(p), rows, [chunks[k] for k in holding], shard_fields, settings, partials=its))
        run_tasks(client, spec, tasks, shard_fields, output, writer, result, progress, log, stop)
        return result


def _shard_fields(spec: ClusterJob, writer: PartWriter) -> dict[str, Any]:
    """The `ShardTask` fields every shard of a run shares."""
    return dict(
        output_url=spec.output.path,
        storage_options=spec.output.storage_options,
        schema=writer.schema,
        metadata=writer.metadata,
        rows_per_part=spec.output.rows_per_part,
        checkpoint_seconds=spec.output.checkpoint_seconds,
        progress_topic=f"prefixbatch-progress-{os.urandom(6).hex()}",  # this run's: a cluster may be shared
        stop_event=f"prefixbatch-stop-{os.urandom(6).hex()}",
    )


def run_on_dask(
    spec: ClusterJob,
    client: Any,
    work: PlannedRequests,
    todo: PreparedInput,
    output: OutputFolder,
    writer: PartWriter,
    progress: Progress,
    *,
    log: Callable[[str], None],
    stop: StopFlag | None = None,
) -> Executed:
    """Run each shard of the plan on the cluster; commit every shard's parts through `output`."""
    result = Executed(resolve_kind(spec.model, spec.executor))
    parts = list(work.shards())
    log(f"dask: {len(parts)} shards of the plan")
    columns = RowColumns(todo.ids, todo.carry)
    fields = _shard_fields(spec, writer)
    tasks = [
        ShardTask(str(k), part, columns.subset(r.row_index for r in part.requests), **fields)
        for k, part in enumerate(parts)
    ]
    run_tasks(client, spec, tasks, fields, output, writer, result, progress, log, stop)
    return result


def run_tasks(client, spec: ClusterJob, tasks: list, fields: dict[str, Any], output, writer, result, progress, log,
              stop: StopFlag | None = None) -> None:
    """Run shard tasks (`ShardTask` or `PartitionTask`), show their progress, commit them.
    `fields`: the run's shared `ShardTask` fields (its progress topic and stop event)."""
    topic = fields["progress_topic"]

    def on_progress(event: tuple[float, dict]) -> None:  # on the client's event loop
        report = event[1]
        progress.running(report["key"], report["rows"], report["tokens"], report.get("prefill", 0))

    client.subscribe_topic(topic, on_progress)
    try:
        with client.as_current():  # for `distributed.wait` in this thread
            _Placer(client, spec, progress, log, stop, fields["stop_event"]).run(tasks, output, writer, result)
    finally:
        client.unsubscribe_topic(topic)


class _Placer:
    """Hands shards to workers one per free thread, and decides what a worker's death means.

    Each shard goes to a worker with a free thread (a preference Dask keeps while that worker
    lives), and no more shards are out than threads: a worker never holds a shard queued
    behind the one it runs. So when a worker dies, the shard that failed with it was running
    there, and each death counts against that shard alone. A shard that has caused
    `max_attempts` deaths is split in halves; a single row that has is a `worker_crash`
    error row. Only the driver retries (Dask's own retries are off for a LocalCluster the
    run starts; a running cluster's `allowed-failures` still applies before the driver's)."""

    def __init__(self, client, spec: ClusterJob, progress: Progress, log, stop: StopFlag | None = None,
                 stop_event: str = "") -> None:
        self.client, self.spec, self.progress, self.log, self.stop = client, spec, progress, log, stop
        self.stop_event = stop_event
        self.resources = spec.cluster.resources or None
        self.out: dict[Any, tuple[Any, str | None]] = {}  # future → (task, worker it was given to)
        self.deaths: dict[str, int] = {}  # shard id → worker deaths it caused

    def run(self, tasks: list, output: OutputFolder, writer: PartWriter, result: Executed) -> None:
        from distributed import Event, wait

        waiting = deque(tasks)
        stopping_since = None
        while waiting or self.out:
            if stopping_since is None and self.stop is not None and self.stop.is_set():
                # Start nothing more; the running shards stop within a step, checkpoint what is
                # in flight and return their whole rows, which are committed below.
                stopping_since = time.monotonic()
                waiting.clear()
                Event(self.stop_event, client=self.client).set()
            if stopping_since is not None and (not self.out or time.monotonic() - stopping_since > STOP_WAIT_S):
                self.client.cancel(list(self.out))
                return
            free = self._free_threads() if stopping_since is None else []
            while waiting and free:
                self._submit(waiting.popleft(), free.pop(0))
            if not self.out:  # no worker is up (restarting after a death): wait for one
                time.sleep(0.2)
                continue
            try:
                done = wait(list(self.out), timeout=STOP_CHECK_S, return_when="FIRST_COMPLETED").done
            except TimeoutError:
                continue
            for future in done:
                task, _ = self.out.pop(future)
                again = self._finished(future, task, output, writer, result)
                if stopping_since is None:
                    waiting.extendleft(reversed(again))

    def _free_threads(self) -> list[str]:
        """A worker address per free thread of the usable workers, least busy first."""
        workers = self.client.scheduler_info()["workers"]
        self.progress.set_workers(len(workers))
        busy = Counter(where for _, where in self.out.values())
        running = {a: w for a, w in workers.items() if w.get("status", "running") == "running"}
        usable = _usable_worker_addresses(self.spec.cluster, running, strict=False)
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

    def _finished(self, future, task, output: OutputFolder, writer: PartWriter, result: Executed) -> list:
        """Commit a shard's result; or, when its worker died, what to run instead."""
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        try:
            shard = future.result()
        except (KilledWorker, FutureCancelledError) as exc:
            self.progress.settle(future.key)
            deaths = self.deaths[task.shard_id] = self.deaths.get(task.shard_id, 0) + 1
            if deaths < self.spec.cluster.max_attempts:
                self.log(f"dask: the worker running shard {task.shard_id} died ({type(exc).__name__}); running it again")
                return [task]
            if task.num_rows > 1:
                self.log(f"dask: shard {task.shard_id} killed {deaths} workers; running it again in halves")
                return task.split()
            if isinstance(task, ShardTask):
                _crash_rows(task, writer, self.progress)
                return []
            return [task.as_crashed()]  # the row's columns are on the workers: one of them writes it
        for record in shard.records:
            output.commit(record)
        result.add(shard)
        self.progress.advance(
            shard.num_requests, shard.output_tokens, settles=future.key,
            prefill_tokens=shard.stats.num_prefill_tokens, unused_tokens=shard.unused_tokens,
        )
        return []


def count_shards(spec: ClusterSpec, client: Any = None) -> int:
    """The shards a run on this cluster cuts its plan into: a LocalCluster's `local_workers`,
    or the workers a running cluster has now (asked through `client`, or a short connection:
    `plan` counts them without starting a run), × `shards_per_worker`."""
    workers = spec.local_workers
    if workers is None and client is not None:
        workers = len(_usable_worker_addresses(spec, client.scheduler_info()["workers"]))
    elif workers is None:
        from distributed import Client

        try:
            with Client(spec.address, timeout=spec.connect_timeout_s, set_as_default=False) as connected:
                return count_shards(spec, connected)
        except (OSError, ValueError) as exc:
            raise UserError(f"cluster.address {spec.address}: cannot reach the Dask scheduler ({exc})") from exc
    return max(workers, 1) * spec.shards_per_worker


def _usable_worker_addresses(spec: ClusterSpec, workers: dict[str, dict], *, strict: bool = True) -> list[str]:
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


__all__ = ["DaskSession", "count_shards", "run_on_dask"]
