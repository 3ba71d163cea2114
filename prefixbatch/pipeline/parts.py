"""Completions → part files of whole input rows, committed by the driver or handed back to it.

A part holds whole input rows (every sample of each), so a commit record can name input
rows and a resume can skip exactly those. The driver's writer commits each part it writes;
a Dask worker's writer only writes its parts and returns their records, which the driver
commits (only the driver commits: each shard once).

in: `Completion`s as they finish → `CommitRecord`s (written parts).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from prefixbatch.pipeline.commits import CommitRecord, OutputFolder, indices_to_ranges
from prefixbatch.pipeline.writer import completions_to_table
from prefixbatch.types import Completion, Request


@dataclass(frozen=True)
class RowColumns:
    """Ids and carried columns by input row: position = row index, or the rows listed in `rows`."""

    ids: pa.Array | pa.ChunkedArray
    carry: pa.Table
    rows: np.ndarray | None = None  # sorted global row index of each position; None: all rows

    def take(self, row_indices: Sequence[int]) -> tuple[pa.Array, pa.Table | None]:
        positions = np.asarray(row_indices, np.int64)
        if self.rows is not None:
            positions = np.searchsorted(self.rows, positions)
        index = pa.array(positions, type=pa.int64())
        carry = self.carry.take(index) if self.carry.num_columns else None
        return self.ids.take(index), carry

    def subset(self, row_indices: Iterable[int]) -> RowColumns:
        """Only these rows (for shipping to a worker)."""
        rows = np.unique(np.fromiter(row_indices, np.int64))
        ids, carry = self.take(rows)
        return RowColumns(ids, carry if carry is not None else pa.table({}), rows)


def samples_per_row(requests: Sequence[Request], errors: Sequence[Completion] = ()) -> Counter[int]:
    counts = Counter(r.row_index for r in requests)
    counts.update(e.row_index for e in errors)
    return counts


class PartWriter:
    """Collects completions until whole input rows are done; writes `rows_per_part` output rows
    a part, sorted by (row, sample); commits each part (`commit=True`) or only keeps its record."""

    def __init__(
        self,
        output: OutputFolder,
        columns: RowColumns,
        *,
        schema: pa.Schema,
        metadata: dict[str, str],
        rows_per_part: int,
        samples_per_row: Counter[int],
        commit: bool,
    ) -> None:
        self.output = output
        self.columns = columns
        self.schema = schema
        self.metadata = metadata
        self.rows_per_part = rows_per_part
        self.samples_left = Counter(samples_per_row)
        self.commit = commit
        self.pending: dict[int, list[Completion]] = {}  # rows with samples still running
        self.ready: list[Completion] = []  # whole rows, not yet written
        self.records: list[CommitRecord] = []

    def add(self, completion: Completion) -> None:
        row = completion.row_index
        self.pending.setdefault(row, []).append(completion)
        self.samples_left[row] -= 1
        if self.samples_left[row] == 0:
            del self.samples_left[row]
            self.ready += self.pending.pop(row)
            if len(self.ready) >= self.rows_per_part:
                self.flush()

    def add_in_place_of_row(self, completion: Completion) -> None:
        """One completion (an error row) standing for its whole row, whatever samples it had."""
        self.pending.pop(completion.row_index, None)
        self.samples_left[completion.row_index] = 1
        self.add(completion)

    def committed_rows(self) -> set[int]:
        """Input rows of the parts this writer wrote (committed, with `commit=True`); safe
        from another thread."""
        return {row for record in list(self.records) for row in record.row_indices().tolist()}

    def flush(self) -> None:
        """Write (and commit) the whole rows collected so far."""
        if not self.ready:
            return
        rows = sorted(self.ready, key=lambda c: (c.row_index, c.sample_index))
        self.ready = []
        ids, carry = self.columns.take([c.row_index for c in rows])
        table = completions_to_table(rows, ids=ids, carry=carry, schema=self.schema)
        unit, name, num_bytes = self.output.write_part(table, metadata=self.metadata)
        record = CommitRecord(
            unit=unit,
            part=name,
            rows=indices_to_ranges(c.row_index for c in rows),
            num_output_rows=len(rows),
            num_bytes=num_bytes,
            stats=part_stats(rows),
        )
        if self.commit:
            self.output.commit(record)
        self.records.append(record)


def part_stats(rows: Sequence[Completion]) -> dict:
    errors = Counter(c.error.split(":", 1)[0] for c in rows if c.error is not None)
    return {
        "prompt_tokens": sum(c.num_prompt_tokens for c in rows),
        "output_tokens": sum(c.num_output_tokens for c in rows),
        "cached_prompt_tokens": sum(c.num_cached_prompt_tokens for c in rows),
        "errors_by_code": dict(errors),
        "constrained_cut": sum(1 for c in rows if c.constrained and c.finish_reason == "length"),
    }


__all__ = ["PartWriter", "RowColumns", "part_stats", "samples_per_row"]
