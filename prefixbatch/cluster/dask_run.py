"""A job's generation on a Dask cluster, in shards cut along the global prefix tree.

The driver has read, tokenized and planned the job (or, with `cluster.plan_on: workers`,
partitioned it: `partition.py`). It cuts the plan into shards along subtree boundaries
(`prefix_tree.shards`: each shared prefix on one worker where possible, shards balanced by
estimated cost, `shards_per_worker` per worker so a slow or lost worker costs little) and
hands each shard to a worker with a free thread (`_Placer`). Each worker loads the engine
once (a worker plugin holds it for the worker's life, loading from the moment the run
connects), runs its shards, writes their part files straight to the output folder and
returns the parts' records; only the driver commits, each shard's records once.

Failures: when a worker dies, the shard it was running runs again elsewhere. A shard whose
workers died `max_attempts` times is split in two and both halves run again, down to the
single row that kills workers, which becomes a `worker_crash` error row. Exactly once holds
because only the driver commits, and it commits a shard's rows only from the one result it
accepts.

in: the requests no commit covers → committed parts; out: the summed executor statistics.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from collections import Counter, deque
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import dask
import numpy as np
import pyarrow as pa
from distributed.diagnostics.plugin import WorkerPlugin

from prefixbatch.cluster import LOAD_LOCK
from prefixbatch.errors import UserError
from prefixbatch.executors.base import ExecutorStats, resolve_kind
from prefixbatch.faults import crash_if_row
from prefixbatch.jobs.progress import JobProgress
from prefixbatch.jobs.spec import JobSpec
from prefixbatch.pipeline.commits import OutputFolder
from prefixbatch.pipeline.parts import PartWriter, RowColumns, samples_per_row
from prefixbatch.pipeline.prepare import PreparedInput
from prefixbatch.prefix_tree import build_plan
from prefixbatch.prefix_tree.requests import prompt_arrays
from prefixbatch.types import Completion, Request, error_completion

PLUGIN_NAME = "prefixbatch-engine"
CRASH_MESSAGE = "this row killed the Dask worker running it on every attempt"
PROGRESS_EVERY_S = 0.5  # a worker's progress reports while a shard runs
WORKERS_EVERY_S = 2.0  # the driver's count of workers alive
DEFAULT_KV_BUDGET = 131_072


@dataclass
class ShardTask:
    """Everything a worker needs for one shard; plain data, pickled to the worker."""

    shard_id: str
    requests: list[Request]
    columns: RowColumns  # ids and carried columns of the shard's rows
    output_url: str
    storage_options: dict[str, Any]
    schema: pa.Schema
    metadata: dict[str, str]
    rows_per_part: int
    progress_topic: str  # where the worker reports rows done while the shard runs
    errors: list[Completion] = field(default_factory=list)  # error rows the shard writes too
    counted_rows: int | None = None  # output rows the driver's progress expects (default: all)

    def __repr__(self) -> str:  # what Dask logs of a failed task: not every request
        return f"ShardTask({self.shard_id}, {len(self.requests)} requests)"

    def call(self) -> tuple[Callable, tuple]:
        """The function and arguments of this shard's Dask task."""
        return run_shard, (self,)

    def split(self) -> list[ShardTask]:
        """Two halves by input row (a row's samples stay together)."""
        rows = self.rows
        halves = (set(rows[: len(rows) // 2]), set(rows[len(rows) // 2 :]))
        return [
            replace(
                self,
                shard_id=f"{self.shard_id}.{k}",
                requests=[r for r in self.requests if r.row_index in half],
                errors=[e for e in self.errors if e.row_index in half],
                columns=self.columns.subset(half),
                counted_rows=None,
            )
            for k, half in enumerate(halves)
        ]

    @property
    def rows(self) -> list[int]:
        """The shard's input rows, sorted (requests' and error rows')."""
        return sorted({r.row_index for r in self.requests} | {e.row_index for e in self.errors})

    @property
    def num_rows(self) -> int:
        return len(self.rows)


@dataclass
class ShardResult:
    shard_id: str
    worker: str  # the worker's address
    pid: int
    records: list  # CommitRecords of the parts it wrote, not committed
    stats: ExecutorStats
    num_requests: int
    output_tokens: int
    rows: list[int] = field(default_factory=list)
    started: float = 0.0  # time.time() on the worker when the shard began
    engine_load_s: float = 0.0  # waiting for the worker's engine to load (its first shard)
    engine_loaded_at: float = 0.0  # time.time() the worker's engine was ready: one value per load
    generate_s: float = 0.0
    finished: float = 0.0


class EnginePlugin(WorkerPlugin):
    """Holds one executor per worker process. Loading starts in the background as soon as
    the plugin is registered (while the driver is still reading and planning); a shard
    waits for it."""

    name = PLUGIN_NAME

    def __init__(self, model: dict, executor: dict) -> None:
        super().__init__()
        self.model = model
        self.executor = executor
        self._executor = None
        self.loaded_at = 0.0
        self._loading: threading.Thread | None = None
        self._error: BaseException | None = None

    def setup(self, worker: Any) -> None:
        self._executor = None
        self._loading = threading.Thread(target=self._load, name="prefixbatch-engine-load", daemon=True)
        self._loading.start()

    def _load(self) -> None:
        from prefixbatch.executors.base import create_executor
        from prefixbatch.executors.config import ExecutorSpec, ModelSpec

        try:
            with LOAD_LOCK:
                self._executor = create_executor(ModelSpec(**self.model), ExecutorSpec(**self.executor))
            self.loaded_at = time.time()
        except BaseException as exc:  # handed to the shard that needs the engine
            self._error = exc

    def get(self, where: str):
        """The worker's executor; a load failure is the user's to fix (the model must be at
        `model.path` on every worker), named with the worker."""
        if self._loading is None:  # not set up by Dask (never on a worker): load here
            self.setup(None)
        self._loading.join()
        if isinstance(self._error, UserError):
            raise UserError(f"worker {where}: {self._error}") from self._error
        if self._error is not None:
            error = f"{type(self._error).__name__}: {self._error}"
            raise UserError(f"worker {where}: cannot load the model at {self.model['path']}: {error}") from self._error
        return self._executor


class _Reporter:
    """Reports a running shard's rows done and tokens generated to the driver every
    `PROGRESS_EVERY_S`, from a thread (rows finish in bursts; tokens flow every step)."""

    def __init__(self, worker: Any, topic: str, stats: ExecutorStats) -> None:
        self.worker, self.topic, self.stats = worker, topic, stats
        self.key = worker.get_current_task()
        self.tokens_before = stats.num_decode_tokens
        self.rows = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prefixbatch-progress", daemon=True)

    def __enter__(self) -> _Reporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(PROGRESS_EVERY_S):
            tokens = self.stats.num_decode_tokens - self.tokens_before
            self.worker.log_event(self.topic, {"key": self.key, "rows": self.rows, "tokens": tokens})


def run_shard(task: ShardTask) -> ShardResult:
    """On a worker: generate the shard with the worker's engine, write its parts, return their records."""
    from distributed import get_worker

    started = time.time()
    worker = get_worker()
    plugin = worker.plugins[PLUGIN_NAME]
    executor = plugin.get(worker.address)
    loaded = time.time()
    for request in task.requests:
        crash_if_row(request.row_index)
    before = ExecutorStats(**vars(executor.stats))
    output = OutputFolder(task.output_url, mode="resume", storage_options=task.storage_options)
    writer = PartWriter(
        output,
        task.columns,
        schema=task.schema,
        metadata=task.metadata,
        rows_per_part=task.rows_per_part,
        samples_per_row=samples_per_row(task.requests, task.errors),
        commit=False,
    )
    for error in task.errors:
        writer.add(error)
    output_tokens = 0
    with _Reporter(worker, task.progress_topic, executor.stats) as reporter:
        for completion in executor.generate(task.requests):
            writer.add(completion)
            output_tokens += completion.num_output_tokens
            reporter.rows += 1
    generated = time.time()
    writer.flush()
    after = executor.stats
    stats = ExecutorStats(**{k: getattr(after, k) - getattr(before, k) for k in vars(after) if k != "peak_kv_tokens"})
    stats.peak_kv_tokens = after.peak_kv_tokens
    return ShardResult(
        task.shard_id,
        worker.address,
        os.getpid(),
        writer.records,
        stats,
        task.counted_rows if task.counted_rows is not None else len(task.requests) + len(task.errors),
        output_tokens,
        task.rows,
        started=started,
        engine_load_s=loaded - started,
        engine_loaded_at=plugin.loaded_at,
        generate_s=generated - loaded,
        finished=time.time(),
    )


class ClusterExecutor:
    """What the run summary reads: the executor kind and the work summed over every shard."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.stats = ExecutorStats()
        self.shards: list[ShardResult] = []

    def add(self, result: ShardResult) -> None:
        self.shards.append(result)
        for key, value in vars(result.stats).items():
            if key == "peak_kv_tokens":
                self.stats.peak_kv_tokens = max(self.stats.peak_kv_tokens, value)
            else:
                setattr(self.stats, key, getattr(self.stats, key) + value)


class DaskSession:
    """The spec's cluster for one run: connected (or, for `local_workers`, started) and told
    to load the engine in the background while the driver reads, tokenizes and plans.

    `with DaskSession(spec) as cluster: ... cluster.run(...)`. Connecting happens in a
    thread, so a LocalCluster's start-up overlaps the driver's reading too.
    """

    def __init__(self, spec: JobSpec) -> None:
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

    def run(self, todo: PreparedInput, output: OutputFolder, writer: PartWriter, progress: JobProgress, *, log) -> ClusterExecutor:
        return run_on_dask(self.spec, self.client, todo, output, writer, progress, log=log)

    def tokenize_on_workers(self, files: list, committed: np.ndarray, progress: JobProgress) -> tuple[list, list]:
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

    def run_partitions(self, files: list, chunks: list, keys: list, output: OutputFolder, writer: PartWriter,
                       progress: JobProgress, *, log) -> ClusterExecutor:
        """The prompts range-partitioned by leading tokens, each partition a shard."""
        from prefixbatch.cluster.partition import PartitionTask, partition_rows

        spec, client = self.spec, self.client
        result = ClusterExecutor(resolve_kind(spec.model, spec.executor))
        workers = _usable_worker_addresses(spec, client.scheduler_info()["workers"])
        partitions = partition_rows(keys, max(len(workers), 1) * spec.cluster.shards_per_worker)
        log(f"dask: {len(workers)} workers, {len(partitions)} partitions planned on the workers")
        shard_fields = _shard_fields(spec, writer)
        starts = np.array([f.first_row_index for f in files])
        tasks = []
        for p, rows in enumerate(partitions):
            holding = np.unique(np.searchsorted(starts, rows, side="right") - 1)  # files with its rows
            # Placed on free workers like shards (left alone, Dask would run every partition
            # where the file chunks are: one worker for a one-file input).
            tasks.append(PartitionTask(str(p), rows, [chunks[k] for k in holding], shard_fields))
        run_tasks(client, spec, tasks, shard_fields["progress_topic"], output, writer, result, progress, log)
        return result


def _shard_fields(spec: JobSpec, writer: PartWriter) -> dict[str, Any]:
    """The `ShardTask` fields every shard of a run shares."""
    return dict(
        output_url=spec.output.path,
        storage_options=spec.output.storage_options,
        schema=writer.schema,
        metadata=writer.metadata,
        rows_per_part=spec.output.rows_per_part,
        progress_topic=f"prefixbatch-progress-{os.urandom(6).hex()}",  # this run's: a cluster may be shared
    )


def plan_shards(spec: JobSpec, todo: PreparedInput, num_shards: int) -> list[list[Request]]:
    """The requests cut into shards along subtree boundaries, each shard in the plan's order."""
    tokens, offsets, max_tokens = prompt_arrays(todo.requests)
    budget = spec.executor.kv_budget_tokens or DEFAULT_KV_BUDGET
    plan = build_plan(tokens, offsets, max_tokens, kv_budget_tokens=max(budget // 2, 1), num_shards=num_shards)
    shards = []
    for shard in plan.shards():
        first, end = shard.group_ids.start, shard.group_ids.stop
        ids = plan.request_order[plan.group_starts[first] : plan.group_starts[end]]
        if len(ids):
            shards.append([todo.requests[i] for i in ids])
    return _whole_rows(shards)


def _whole_rows(shards: list[list[Request]]) -> list[list[Request]]:
    """Keep every sample of a row in the first shard that has one (a part holds whole rows)."""
    home: dict[int, int] = {}
    for k, shard in enumerate(shards):
        for request in shard:
            home.setdefault(request.row_index, k)
    fixed: list[list[Request]] = [[] for _ in shards]
    for shard in shards:
        for request in shard:
            fixed[home[request.row_index]].append(request)
    return [s for s in fixed if s]


def run_on_dask(
    spec: JobSpec,
    client: Any,
    todo: PreparedInput,
    output: OutputFolder,
    writer: PartWriter,
    progress: JobProgress,
    *,
    log: Callable[[str], None],
) -> ClusterExecutor:
    """Generate `todo.requests` on the cluster; commit every shard's parts through `output`."""
    result = ClusterExecutor(resolve_kind(spec.model, spec.executor))
    num_workers = max(len(_usable_worker_addresses(spec, client.scheduler_info()["workers"])), 1)
    shards = plan_shards(spec, todo, num_workers * spec.cluster.shards_per_worker)
    log(f"dask: {num_workers} workers, {len(shards)} shards")
    columns = RowColumns(todo.ids, todo.carry)
    fields = _shard_fields(spec, writer)
    tasks = [
        ShardTask(str(k), requests, columns.subset(r.row_index for r in requests), **fields)
        for k, requests in enumerate(shards)
    ]
    run_tasks(client, spec, tasks, fields["progress_topic"], output, writer, result, progress, log)
    return result


def run_tasks(client, spec: JobSpec, tasks: list, topic: str, output, writer, result, progress, log) -> None:
    """Run shard tasks (`ShardTask` or `PartitionTask`), show their progress, commit them."""

    def on_progress(event: tuple[float, dict]) -> None:  # on the client's event loop
        report = event[1]
        progress.running(report["key"], report["rows"], report["tokens"])

    client.subscribe_topic(topic, on_progress)
    try:
        with client.as_current():  # for `distributed.wait` in this thread
            _Placer(client, spec, progress, log).run(tasks, output, writer, result)
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

    def __init__(self, client, spec: JobSpec, progress: JobProgress, log) -> None:
        self.client, self.spec, self.progress, self.log = client, spec, progress, log
        self.resources = spec.cluster.resources or None
        self.out: dict[Any, tuple[Any, str | None]] = {}  # future → (task, worker it was given to)
        self.deaths: dict[str, int] = {}  # shard id → worker deaths it caused

    def run(self, tasks: list, output: OutputFolder, writer: PartWriter, result: ClusterExecutor) -> None:
        from distributed import wait

        waiting = deque(tasks)
        while waiting or self.out:
            free = self._free_threads()
            while waiting and free:
                self._submit(waiting.popleft(), free.pop(0))
            if not self.out:  # no worker is up (restarting after a death): wait for one
                time.sleep(0.2)
                continue
            try:
                done = wait(list(self.out), timeout=WORKERS_EVERY_S, return_when="FIRST_COMPLETED").done
            except TimeoutError:
                continue
            for future in done:
                task, _ = self.out.pop(future)
                again = self._finished(future, task, output, writer, result)
                waiting.extendleft(reversed(again))

    def _free_threads(self) -> list[str]:
        """A worker address per free thread of the usable workers, least busy first."""
        workers = self.client.scheduler_info()["workers"]
        self.progress.set_workers(len(workers))
        busy = Counter(where for _, where in self.out.values())
        running = {a: w for a, w in workers.items() if w.get("status", "running") == "running"}
        usable = _usable_worker_addresses(self.spec, running, strict=False)
        slots = {a: max(_capacity(self.spec, running[a]) - busy[a], 0) for a in usable}
        return [a for a in sorted(slots, key=lambda a: -slots[a]) for _ in range(slots[a])]

    def _submit(self, task, where: str | None) -> None:
        key = f"shard-{task.shard_id}-{os.urandom(4).hex()}"  # a fresh key per attempt
        function, args = task.call()
        future = self.client.submit(
            function, *args, key=key, pure=False, resources=self.resources,
            workers=[where] if where else None, allow_other_workers=where is not None,
        )
        self.out[future] = (task, where)

    def _finished(self, future, task, output: OutputFolder, writer: PartWriter, result: ClusterExecutor) -> list:
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
        self.progress.advance(shard.num_requests, shard.output_tokens, settles=future.key)
        return []


def _usable_worker_addresses(spec: JobSpec, workers: dict[str, dict], *, strict: bool = True) -> list[str]:
    """The workers that can run a shard (have `cluster.resources`); none (`strict`) is a user
    error, not a job that waits forever."""
    need = spec.cluster.resources
    usable = [a for a, w in workers.items() if all(w.get("resources", {}).get(k, 0) >= v for k, v in need.items())]
    if strict and need and not usable:
        where = spec.cluster.address or "the local cluster"
        have = sorted({_resources_text(w.get("resources") or {}) for w in workers.values()}) or ["no workers"]
        raise UserError(
            f"cluster.resources {_resources_text(need)}: no worker of {where} has them (workers have: "
            f"{'; '.join(have)}); start the workers with `--resources`, or change cluster.resources"
        )
    return sorted(usable)


def _capacity(spec: JobSpec, worker: dict) -> int:
    """Shards a worker runs at once: its threads, and no more than its resources allow."""
    have = worker.get("resources") or {}
    return min([int(worker.get("nthreads", 1))] + [int(have.get(k, 0) // v) for k, v in spec.cluster.resources.items() if v > 0])


def _resources_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "none"


def _crash_rows(task: ShardTask, writer: PartWriter, progress: JobProgress) -> None:
    """The row of a one-row shard that killed every worker it ran on: an error row, committed."""
    [row] = {r.row_index for r in task.requests}
    tokens = len(task.requests[0].token_ids)
    writer.add_in_place_of_row(error_completion(row, "worker_crash", CRASH_MESSAGE, num_prompt_tokens=tokens))
    writer.flush()
    progress.advance(len(task.requests), 0)


__all__ = ["DaskSession", "EnginePlugin", "ShardTask", "plan_shards", "run_on_dask", "run_shard"]
