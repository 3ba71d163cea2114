"""A job's generation on a Dask cluster, in shards cut along the global prefix tree.

The driver has read, tokenized and planned the job for `num_shards()` shards (or, with
`cluster.plan_on: workers`, partitioned it: `partition.py`). The plan's shards are cut
along subtree boundaries (each shared prefix on one worker where possible, balanced by
estimated cost, `shards_per_worker` per worker so a slow or lost worker costs little, a
row's samples never apart); each shard's part of the plan goes to a worker with a free
thread (`placer.py`), which runs it as given (`worker.py`). Only the driver commits, each
shard's records once. The cluster code reads the sub-specs it needs (`ClusterJob`) and
reports through a `Progress`, never the job layer's objects.

Failures: when a worker dies, the shard it was running runs again elsewhere. A shard whose
workers died `max_attempts` times is split in two and both halves run again, down to the
single row that kills workers, which becomes a `worker_crash` error row. Exactly once holds
because only the driver commits, and it commits a shard's rows only from the one result it
accepts. No wait of the driver is unbounded: with no worker to run on for
`cluster.worker_wait_s`, the run stops with an error and keeps what it committed.

in: the plan of the requests no commit covers → committed parts; out: `Executed` (work summed over shards).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import dask
import numpy as np

from prefixbatch.cluster.config import ClusterJob, ClusterSpec, Progress
from prefixbatch.cluster.local_cluster import local_worker_count, start_local_cluster
from prefixbatch.cluster.placer import Placer, as_finished, usable_worker_addresses
from prefixbatch.cluster.worker import PLUGIN_NAME, EnginePlugin, ShardTask
from prefixbatch.errors import UserError
from prefixbatch.executors.base import Executed, StopFlag
from prefixbatch.executors.registry import ResolvedExecutor
from prefixbatch.pipeline.checkpoints import Partials
from prefixbatch.pipeline.commits import OutputFolder
from prefixbatch.pipeline.parts import PartWriter, RowColumns
from prefixbatch.pipeline.prepare import PreparedInput
from prefixbatch.prefix_tree import PlannedRequests, PlanSettings

NANNY_KEPT_FOR = "365 days"  # see `DaskSession._connect`: never, within a run


class DaskSession:
    """The spec's cluster for one run: connected (or, for `local_workers`, started) and told
    to load the engine in the background while the driver reads, tokenizes and plans.

    `with DaskSession(spec) as cluster: ... cluster.run(...)`. Connecting happens in a
    thread, so a LocalCluster's start-up overlaps the driver's reading too.
    """

    def __init__(self, spec: ClusterJob, resolved: ResolvedExecutor) -> None:
        self.spec = spec
        self.resolved = resolved  # the job's executor, as the driver resolved it; each worker loads it
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
        from distributed import Client

        spec = self.spec.cluster
        settings = {
            # The driver retries shards itself (`Placer`): a death fails the shard at once.
            "distributed.scheduler.allowed-failures": 0,
            # A LocalCluster closes a worker's nanny for good when no worker of its name is up
            # 15 s after a death, even one restarting after a later death: a row that kills
            # workers in quick succession (or slow restarts) left none, and the run waiting
            # forever. The nannies restart their workers; `worker_wait_s` bounds the wait.
            "distributed.deploy.lost-worker-timeout": NANNY_KEPT_FOR,
        }
        self._stack.enter_context(dask.config.set(settings))
        # Closed by callbacks, not as context managers: they are made in this thread and
        # closed in the caller's (a Client's context holds a context variable of its thread).
        if spec.address is not None:
            try:
                client = Client(spec.address, timeout=spec.connect_timeout_s, set_as_default=False)
            except (OSError, ValueError) as exc:  # refused, timed out, or not an address
                raise UserError(f"cluster.address {spec.address}: cannot reach the Dask scheduler ({exc})") from exc
        else:
            cluster = start_local_cluster(spec)
            self._stack.callback(cluster.close)
            client = Client(cluster, set_as_default=False)
        self._stack.callback(client.close)
        plugin = EnginePlugin(self.spec.model.model_dump(), self.spec.executor.model_dump(), self.resolved)
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
        return run_on_dask(self.spec, self.client, work, todo, output, writer, progress, log=log, stop=stop,
                           kind=self.resolved.name)

    def tokenize_on_workers(self, files: list, committed: np.ndarray, progress: Progress) -> tuple[list, list]:
        """One task per input file: read and tokenize it on a worker (kept there); the
        futures of the file chunks and, fetched, their partition keys."""
        from prefixbatch.cluster.partition import chunk_keys, tokenize_file

        client = self.client
        chunks, key_futures = [], {}
        for k, file in enumerate(files):
            first, end = np.searchsorted(committed, [file.first_row_index, file.first_row_index + file.num_rows])
            chunk = client.submit(tokenize_file, self.spec, files, k, committed[first:end], pure=False)
            chunks.append(chunk)
            key_futures[client.submit(chunk_keys, chunk, pure=False)] = k
        keys: list = [None] * len(files)
        for future in as_finished(client, self.spec.cluster, list(key_futures)):
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
        result = Executed(self.resolved.name)
        workers = usable_worker_addresses(spec.cluster, client.scheduler_info()["workers"])
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
    kind: str,
) -> Executed:
    """Run each shard of the plan on the cluster; commit every shard's parts through `output`;
    `kind`: the executor the workers run."""
    result = Executed(kind)
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
            Placer(client, spec, progress, log, stop, fields["stop_event"]).run(tasks, output, writer, result)
    finally:
        client.unsubscribe_topic(topic)


def count_shards(spec: ClusterSpec, client: Any = None) -> int:
    """The shards a run on this cluster cuts its plan into: a LocalCluster's workers
    (`local_workers`, or one per visible GPU), or the workers a running cluster has now (asked
    through `client`, or a short connection: `plan` counts them without starting a run),
    × `shards_per_worker`."""
    workers = local_worker_count(spec) if spec.local_workers is not None else None
    if workers is None and client is not None:
        workers = len(usable_worker_addresses(spec, client.scheduler_info()["workers"]))
    elif workers is None:
        from distributed import Client

        try:
            with Client(spec.address, timeout=spec.connect_timeout_s, set_as_default=False) as connected:
                return count_shards(spec, connected)
        except (OSError, ValueError) as exc:
            raise UserError(f"cluster.address {spec.address}: cannot reach the Dask scheduler ({exc})") from exc
    return max(workers, 1) * spec.shards_per_worker


__all__ = ["DaskSession", "count_shards", "run_on_dask"]
