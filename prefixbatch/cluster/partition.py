"""Planning on the workers, for inputs too large for the driver (`cluster.plan_on: workers`).

The driver of a normal run holds every prompt's tokens to build one tree. Here it never
reads a prompt:

1. One task per input file reads, checks and tokenizes that file on a worker, with the job's
   column types. The tokenized rows stay on that worker (a Dask future); the driver gets
   only, per request, its first `KEY_TOKENS` tokens, its row and its estimated work.
2. The driver sorts those keys. The prefix tree's order is lexicographic, so prompts that
   share leading tokens become neighbours; it cuts the sorted list into partitions where
   neighbours share the fewest leading tokens near balanced work targets (`balanced_cuts`,
   the rule that cuts shards; work as the tree counts it, a shared prefix once), keeping a
   row's samples together.
3. One task per partition gathers its rows from the file tasks' results (Dask moves them
   between workers), plans its own prompts with the planning entry point under the settings
   the driver resolved for the job (`PlanSettings`, one shard), and runs as a shard: parts
   written by the worker, committed once by the driver.

What the driver holds: ids (for the uniqueness check), and `KEY_TOKENS` + 3 numbers per
request. Neighbours whose keys are equal to the end are taken to share their whole shorter
prompt (the most they can), so a cut avoids the inside of a long shared prefix where a
boundary with a shorter shared prefix lies within half a partition of the target.

in: the spec, the scanned files, the committed rows → out: `PartitionTask`s to run as shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from prefixbatch.cluster import LOAD_LOCK
from prefixbatch.cluster.worker import CRASH_MESSAGE, ShardTask, run_shard
from prefixbatch.pipeline.checkpoints import Partials, continue_from
from prefixbatch.pipeline.parts import RowColumns
from prefixbatch.pipeline.prepare import PreparedInput, in_rows, prepare_input
from prefixbatch.pipeline.reader import InputFile
from prefixbatch.pipeline.tokenize import PromptTokenizer, prompt_tokenizer
from prefixbatch.prefix_tree import PlanSettings, plan_requests
from prefixbatch.prefix_tree.cuts import balanced_cuts
from prefixbatch.types import error_completion

KEY_TOKENS = 64  # leading tokens of a prompt the driver sorts by


@dataclass
class FileChunk:
    """One input file's rows, tokenized on a worker (kept there)."""

    prepared: PreparedInput  # requests and error rows, by global row index
    columns: RowColumns  # ids and carried columns, by global row index


@dataclass
class ChunkKeys:
    """What the driver learns of a file chunk: enough to partition, nothing more."""

    request_rows: np.ndarray  # [n] row index of each request
    keys: np.ndarray  # [n, KEY_TOKENS] int32 leading tokens, -1 past the prompt's end
    cost: np.ndarray  # [n] prompt tokens + max_tokens: the request's work
    lengths: np.ndarray  # [n] prompt tokens
    error_rows: np.ndarray  # rows that are error rows (never generated)
    num_clamped: int
    num_truncated: int


@dataclass
class PartitionTask:
    """One partition of the job: the rows it covers and the file chunks that hold them."""

    shard_id: str
    rows: np.ndarray  # sorted global row indices (requests' rows and error rows)
    chunks: list[Any]  # Dask futures of the `FileChunk`s holding these rows
    shard_fields: dict[str, Any]  # the `ShardTask` fields every partition shares
    settings: PlanSettings  # the job's, resolved by the driver; one shard
    crashed: bool = False  # run no request: write the row as a `worker_crash` error row
    partials: Partials = field(default_factory=dict)  # its rows' checkpointed generations

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def split(self) -> list[PartitionTask]:
        half = len(self.rows) // 2
        return [
            replace(self, shard_id=f"{self.shard_id}.{k}", rows=rows)
            for k, rows in enumerate((self.rows[:half], self.rows[half:]))
        ]

    def as_crashed(self) -> PartitionTask:
        return replace(self, crashed=True)

    def call(self) -> tuple[Any, tuple]:
        """The function and arguments of this partition's Dask task."""
        args = (self.shard_id, self.rows, self.crashed, self.shard_fields, self.settings, self.partials)
        return run_partition, (*args, *self.chunks)


_tokenizers: dict[tuple[str, bool], PromptTokenizer] = {}  # a worker's, by model settings


def _tokenizer(spec: Any) -> PromptTokenizer:
    """The job's prompt tokenizer, loaded once per worker process."""
    key = (spec.model.model_dump_json(), spec.input.messages_column is not None)
    with LOAD_LOCK:  # not while the engine plugin imports transformers in its thread
        if key not in _tokenizers:
            _tokenizers[key] = prompt_tokenizer(spec.model, messages=spec.input.messages_column is not None)
        return _tokenizers[key]


def tokenize_file(spec: Any, files: list[InputFile], k: int, done: np.ndarray) -> FileChunk:
    """On a worker: file `k` of the job read, checked and tokenized; `done` rows left out."""
    file = files[k]
    prepared = prepare_input([file], spec.input, spec.sampling, _tokenizer(spec), job_files=files)
    rows = np.arange(file.first_row_index, file.first_row_index + file.num_rows, dtype=np.int64)
    return FileChunk(prepared.without_rows(done), RowColumns(prepared.ids, prepared.carry, rows))


def chunk_keys(chunk: FileChunk) -> ChunkKeys:
    """On the worker holding `chunk`: its requests' sort keys and work."""
    requests = chunk.prepared.requests
    keys = np.full((len(requests), KEY_TOKENS), -1, np.int32)
    for i, request in enumerate(requests):
        lead = request.token_ids[:KEY_TOKENS]
        keys[i, : len(lead)] = lead
    return ChunkKeys(
        request_rows=np.array([r.row_index for r in requests], np.int64),
        keys=keys,
        cost=np.array([len(r.token_ids) + r.sampling.max_tokens for r in requests], np.int64),
        lengths=np.array([len(r.token_ids) for r in requests], np.int64),
        error_rows=np.array([e.row_index for e in chunk.prepared.errors], np.int64),
        num_clamped=chunk.prepared.num_clamped,
        num_truncated=chunk.prepared.num_truncated,
    )


def partition_rows(keys: list[ChunkKeys], num_partitions: int) -> list[np.ndarray]:
    """Sorted row indices of each partition (empty partitions dropped).

    Requests sorted by their leading tokens and cut where neighbours share little; a row
    goes where its first request in that order went; error rows are spread evenly.
    """
    rows = np.concatenate([k.request_rows for k in keys]) if keys else np.zeros(0, np.int64)
    errors = np.concatenate([k.error_rows for k in keys]) if keys else np.zeros(0, np.int64)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    if len(rows):
        lead = np.concatenate([k.keys for k in keys])
        cost = np.concatenate([k.cost for k in keys])
        order = np.lexsort(lead.T[::-1])  # by token 0, then token 1, ...
        ordered = lead[order]
        lengths = np.concatenate([k.lengths for k in keys])[order]
        shared = np.zeros(len(order), np.int64)  # leading tokens shared with the previous one
        shared[1:] = np.cumprod(ordered[1:] == ordered[:-1], axis=1).sum(axis=1)
        # Keys equal to the end: the prompts may share far more than the key shows; count
        # the most they can share, so a cut avoids the inside of a long shared prefix.
        whole = shared[1:] == KEY_TOKENS
        shared[1:][whole] = np.minimum(lengths[1:], lengths[:-1])[whole]
        # Work in this order as the tree counts it: a request's tokens past what it shares
        # with its neighbour (a shared prefix is computed once), plus its max_tokens.
        starts = balanced_cuts(cost[order] - shared, shared, num_partitions)
        part_at = np.repeat(np.arange(num_partitions), np.diff(starts))  # partition of each position
        row_list, first_position = np.unique(rows[order], return_index=True)  # a row's first request
        row_part = part_at[first_position]
        for p in range(num_partitions):
            parts[p].append(row_list[row_part == p])
    errors = np.sort(errors)
    for p in range(num_partitions):
        parts[p].append(errors[p::num_partitions])
    merged = [np.unique(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]
    return [p for p in merged if len(p)]


def run_partition(shard_id: str, rows: np.ndarray, crashed: bool, shard_fields: dict, settings: PlanSettings,
                  partials: Partials, *chunks: FileChunk):
    """On a worker: the partition's rows gathered from the file chunks, each continued from
    its checkpointed tokens (if any), planned, run as a shard."""
    requests, errors, columns = [], [], []
    for chunk in chunks:
        mine_requests = in_rows(chunk.prepared.requests, rows)
        requests += [r for r, mine in zip(chunk.prepared.requests, mine_requests) if mine]
        errors += [e for e, mine in zip(chunk.prepared.errors, in_rows(chunk.prepared.errors, rows)) if mine]
        mine = rows[(rows >= chunk.columns.rows[0]) & (rows <= chunk.columns.rows[-1])] if len(chunk.columns.rows) else rows[:0]
        if len(mine):
            columns.append(chunk.columns.subset(mine.tolist()))
    counted = len(requests) + len(errors)
    if crashed:  # the one row that killed every worker it ran on
        [row] = rows.tolist()
        tokens = len(requests[0].token_ids) if requests else 0
        requests, errors = [], [error_completion(row, "worker_crash", CRASH_MESSAGE, num_prompt_tokens=tokens)]
    requests, used = continue_from(requests, partials)
    task = ShardTask(
        shard_id,
        plan_requests(requests, settings) if requests else None,
        _concat_columns(columns),
        errors=errors,
        counted_rows=counted,
        **shard_fields,
    )
    result = run_shard(task)
    result.resumed = (len({row for row, _ in used}), sum(map(len, used.values())))
    return result


def _concat_columns(parts: list[RowColumns]) -> RowColumns:
    ids = pa.chunked_array([c for p in parts for c in pa.chunked_array(p.ids).chunks])
    carry = pa.concat_tables([p.carry for p in parts]) if parts and parts[0].carry.num_columns else pa.table({})
    rows = np.concatenate([p.rows for p in parts]) if parts else np.zeros(0, np.int64)
    return RowColumns(ids, carry, rows)


__all__ = ["ChunkKeys", "FileChunk", "PartitionTask", "chunk_keys", "partition_rows", "run_partition", "tokenize_file"]
