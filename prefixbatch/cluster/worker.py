"""The worker side of a Dask run: one engine per worker process, shards run on it.

A `ShardTask` is plain data pickled to a worker: its part of the job's plan (a one-shard
`PlannedRequests`, cut by the driver: the worker never plans it again), the columns of its
rows, and where to write. `run_shard` runs it on the worker's executor (loaded once per
worker by `EnginePlugin`, in the background from the moment the run connects, as the driver
resolved it: its kind and budget, the device this worker has) through the loop every run
calls (`executors.loop`), writes its part files straight to the output folder and returns
their records, uncommitted: only the driver commits. `_Reporter` sends the driver the
shard's progress while it runs.

in: a `ShardTask` → out: a `ShardResult` (records, work done, timings).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
from distributed.diagnostics.plugin import WorkerPlugin

from prefixbatch.cluster import LOAD_LOCK
from prefixbatch.errors import UserError
from prefixbatch.executors.base import ExecutorStats
from prefixbatch.executors.loop import Generated, generate_into
from prefixbatch.executors.registry import ResolvedExecutor
from prefixbatch.faults import crash_if_row
from prefixbatch.periodic import Periodic
from prefixbatch.pipeline.checkpoints import Checkpoints
from prefixbatch.pipeline.commits import OutputFolder
from prefixbatch.pipeline.parts import PartWriter, RowColumns, samples_per_row
from prefixbatch.prefix_tree import PlannedRequests
from prefixbatch.types import Completion, Request

PLUGIN_NAME = "prefixbatch-engine"
CRASH_MESSAGE = "this row killed the Dask worker running it on every attempt"
PROGRESS_EVERY_S = 0.5  # a worker's progress reports while a shard runs


@dataclass
class ShardTask:
    """Everything a worker needs for one shard; plain data, pickled to the worker."""

    shard_id: str
    work: PlannedRequests | None  # its part of the plan (None: error rows only)
    columns: RowColumns  # ids and carried columns of the shard's rows
    output_url: str
    storage_options: dict[str, Any]
    schema: pa.Schema
    metadata: dict[str, str]
    rows_per_part: int
    progress_topic: str  # where the worker reports rows done while the shard runs
    stop_event: str  # name of the run's Dask Event the driver sets to stop gracefully
    checkpoint_seconds: float | None  # how often the worker checkpoints its generations in flight
    errors: list[Completion] = field(default_factory=list)  # error rows the shard writes too
    counted_rows: int | None = None  # output rows the driver's progress expects (default: all)

    def __repr__(self) -> str:  # what Dask logs of a failed task: not every request
        return f"ShardTask({self.shard_id}, {len(self.requests)} requests)"

    @property
    def requests(self) -> tuple[Request, ...]:
        return self.work.requests if self.work is not None else ()

    def call(self) -> tuple[Callable, tuple]:
        """The function and arguments of this shard's Dask task."""
        return run_shard, (self,)

    def split(self) -> list[ShardTask]:
        """Two halves by input row (a row's samples stay together), each planned again with
        the plan's own settings (the driver's only plan after the job's: a crash hunt)."""
        rows = self.rows
        halves = (set(rows[: len(rows) // 2]), set(rows[len(rows) // 2 :]))
        return [
            replace(
                self,
                shard_id=f"{self.shard_id}.{k}",
                work=self.work.subset(lambda r, half=half: r.row_index in half) if self.work else None,
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
    unused_tokens: int = 0  # max_tokens its rows did not use (stopped early): done work for the ETA
    resumed: tuple[int, int] = (0, 0)  # plan_on workers: (rows, tokens) continued from checkpoints


class EnginePlugin(WorkerPlugin):
    """Holds one executor per worker process. Loading starts in the background as soon as
    the plugin is registered (while the driver is still reading and planning); a shard
    waits for it."""

    name = PLUGIN_NAME

    def __init__(self, model: dict, executor: dict, resolved: ResolvedExecutor) -> None:
        super().__init__()
        self.model = model
        self.executor = executor
        self.resolved = resolved  # the driver's; this worker's device once loaded
        self._executor = None
        self.loaded_at = 0.0
        self._loading: threading.Thread | None = None
        self._error: BaseException | None = None

    def setup(self, worker: Any) -> None:
        self._executor = None
        self._loading = threading.Thread(target=self._load, name="prefixbatch-engine-load", daemon=True)
        self._loading.start()

    def _load(self) -> None:
        from prefixbatch.executors.config import ExecutorSpec, ModelSpec
        from prefixbatch.executors.registry import create_executor

        try:
            model, executor = ModelSpec(**self.model), ExecutorSpec(**self.executor)
            with LOAD_LOCK:
                self.resolved = self.resolved.on_worker(model, executor)
                self._executor = create_executor(model, executor, self.resolved)
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


class _Reporter(Periodic):
    """Reports a running shard's rows done and tokens computed to the driver every
    `PROGRESS_EVERY_S`, from a thread (rows finish in bursts; tokens flow every step)."""

    def __init__(self, worker: Any, topic: str, stats: ExecutorStats) -> None:
        super().__init__(PROGRESS_EVERY_S, self._report, name="prefixbatch-progress")
        self.worker, self.topic, self.stats = worker, topic, stats
        self.key = worker.get_current_task()
        self.before = stats.copy()
        self.rows = 0

    def completed(self, completion: Completion, unused_tokens: int) -> None:
        self.rows += 1

    def _report(self) -> None:
        done = self.stats.since(self.before)
        report = {"key": self.key, "rows": self.rows, "tokens": done.num_decode_tokens, "prefill": done.num_prefill_tokens}
        self.worker.log_event(self.topic, report)


class _DriverStop:
    """The driver's graceful stop, seen from a worker: its Dask Event, asked at most every
    `PROGRESS_EVERY_S` (the engine asks before every step)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._set = False
        self._asked = 0.0

    def is_set(self) -> bool:
        if not self._set and time.monotonic() - self._asked >= PROGRESS_EVERY_S:
            from distributed import Event

            self._asked = time.monotonic()
            self._set = Event(self.name).is_set()
        return self._set


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
    before = executor.stats.copy()
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
    stop = _DriverStop(task.stop_event)
    done = Generated()
    with _Reporter(worker, task.progress_topic, executor.stats) as reporter:
        if task.work is not None:  # once stopped: what is in flight saved, the whole rows handed back
            done = generate_into(
                executor, plugin.resolved, task.work, writer, Checkpoints(output),
                checkpoint_seconds=task.checkpoint_seconds, stop=stop, on_completion=reporter.completed,
            )
    generated = time.time()
    writer.flush()
    stats = executor.stats.since(before)
    return ShardResult(
        task.shard_id,
        worker.address,
        os.getpid(),
        writer.records,
        stats,
        (done.num_completions + len(task.errors)) if stop.is_set() else (
            task.counted_rows if task.counted_rows is not None else len(task.requests) + len(task.errors)
        ),
        done.num_output_tokens,
        task.rows,
        started=started,
        engine_load_s=loaded - started,
        engine_loaded_at=plugin.loaded_at,
        generate_s=generated - loaded,
        finished=time.time(),
        unused_tokens=done.num_unused_tokens,
    )


__all__ = ["CRASH_MESSAGE", "EnginePlugin", "ShardResult", "ShardTask", "run_shard"]
