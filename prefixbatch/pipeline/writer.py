"""Writing the job's output: Parquet part files and JSON side files in one output folder.

Owns the output schema, turning `Completion`s into a table of that schema, claiming the
output folder (mode error / overwrite), and writing each file so that it is never seen half
written: on a local disk under a temporary name then renamed, on an object store as one PUT
(an object appears only when its upload completes).

Invariants:
- Every part is written against the explicit `output_schema`, whatever the batch held.
- Parts are named part-00000.parquet, part-00001.parquet, ... in write order; temporary
  names start with "_" so Parquet readers (pyarrow datasets, Spark) skip them.
- `check()` never writes; `prepare()` is the only call that deletes anything.

in: `Completion`s + ids + carried columns -> Arrow table -> files under the output URL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefixbatch.errors import OutputError, SpecError
from prefixbatch.pipeline.storage import is_local, open_fs, to_url
from prefixbatch.types import Completion

OutputMode = Literal["error", "overwrite", "resume"]

# The columns prefixbatch writes after the id and the carried columns.
RESULT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("sample_index", pa.int32(), nullable=False),  # 0..n-1; 0 on error rows
    pa.field("output_text", pa.string()),  # null on error rows
    pa.field("output_token_ids", pa.list_(pa.int32())),  # null on error rows
    pa.field("finish_reason", pa.string(), nullable=False),  # "stop" | "length" | "error"
    pa.field("num_prompt_tokens", pa.int32(), nullable=False),
    pa.field("num_output_tokens", pa.int32(), nullable=False),
    pa.field("num_cached_prompt_tokens", pa.int32(), nullable=False),
    pa.field("error", pa.string()),  # null, or "code: message"
)
_RESULT_NAMES = tuple(f.name for f in RESULT_FIELDS)


def output_schema(
    id_type: pa.DataType, carry_fields: Sequence[pa.Field], *, id_column: str
) -> pa.Schema:
    """The id column (named as in the input), the carried columns, then the result columns."""
    fields = [pa.field(id_column, id_type), *carry_fields, *RESULT_FIELDS]
    names = [f.name for f in fields]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        msg = (
            f"output columns would repeat {clashes}: the id column and carry_columns must not"
            f" reuse each other's names or prefixbatch's own ({', '.join(_RESULT_NAMES)})"
        )
        raise SpecError(msg)
    return pa.schema(fields)


def completions_to_table(
    completions: Sequence[Completion],
    *,
    ids: pa.Array | pa.ChunkedArray,
    carry: pa.Table | None,
    schema: pa.Schema,
) -> pa.Table:
    """One row per completion (per sample of a row); `ids` and `carry` rows are aligned with
    `completions`, so a row's id and carried values repeat once per sample."""
    num_rows = len(completions)
    num_carry = num_rows if carry is None else carry.num_rows
    if len(ids) != num_rows or num_carry != num_rows:  # a caller bug, not a user mistake
        msg = f"{num_rows} completions but {len(ids)} ids and {num_carry} carry rows"
        raise ValueError(msg)
    columns: dict[str, Any] = {schema.field(0).name: ids}
    if carry is not None:
        columns.update({name: carry.column(name) for name in carry.column_names})
    columns.update(_result_columns(completions))
    arrays = [_as_type(columns[field.name], field.type) for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _result_columns(completions: Sequence[Completion]) -> dict[str, pa.Array]:
    is_error = [c.finish_reason == "error" for c in completions]
    # Token ids as one flat buffer plus offsets: no Python list per row.
    offsets = np.zeros(len(completions) + 1, np.int32)
    np.cumsum([len(c.token_ids) for c in completions], out=offsets[1:])
    flat = (t for c in completions for t in c.token_ids)
    values = pa.array(np.fromiter(flat, np.int32, int(offsets[-1])))
    texts = [None if c.finish_reason == "error" else c.text for c in completions]
    cached = [c.num_cached_prompt_tokens for c in completions]
    return {
        "sample_index": pa.array([c.sample_index for c in completions], pa.int32()),
        "output_text": pa.array(texts, pa.string()),
        "output_token_ids": pa.ListArray.from_arrays(
            pa.array(offsets), values, mask=pa.array(is_error, pa.bool_())
        ),
        "finish_reason": pa.array([c.finish_reason for c in completions], pa.string()),
        "num_prompt_tokens": pa.array([c.num_prompt_tokens for c in completions], pa.int32()),
        "num_output_tokens": pa.array(np.diff(offsets)),
        "num_cached_prompt_tokens": pa.array(cached, pa.int32()),
        "error": pa.array([c.error for c in completions], pa.string()),
    }


def _as_type(column: pa.Array | pa.ChunkedArray, target: pa.DataType) -> pa.Array:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column if column.type == target else column.cast(target)


class OutputFolder:
    """The job's output folder: claimed once, then written part by part."""

    def __init__(
        self, url: str, *, mode: OutputMode, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.url = url
        self.mode = mode
        self._fs, self._path = open_fs(url, storage_options)
        self._path = self._path.rstrip("/")
        self._num_parts = 0

    def check(self) -> None:
        """Raise `OutputError` if `prepare()` would refuse; writes nothing."""
        if self.mode == "resume":
            raise OutputError("output.mode: resume is not supported yet")
        if self.mode not in ("error", "overwrite"):
            msg = f"output.mode must be one of error, overwrite, resume; got {self.mode!r}"
            raise OutputError(msg)
        if not self._path.strip("/"):  # "/" or "s3://": never empty a whole filesystem
            raise OutputError(f"output path {self.url} is a filesystem root; name a folder in it")
        if self._fs.isfile(self._path):
            raise OutputError(f"output path {self.url} is a file; it must be a folder")
        if self.mode == "error" and self._entries():
            msg = (
                f"output folder {self.url} is not empty; choose an empty folder, or set"
                " output.mode: overwrite to replace its contents"
            )
            raise OutputError(msg)

    def prepare(self) -> None:
        """Check, then empty the folder (mode overwrite) and make sure it exists."""
        self.check()
        for entry in self._entries():
            self._fs.rm(entry, recursive=True)
        self._fs.makedirs(self._path, exist_ok=True)

    def write_part(self, table: pa.Table, *, metadata: dict[str, str]) -> str:
        """Write the next part file with `metadata` merged into the schema metadata; its URL."""
        ours = {key.encode(): value.encode() for key, value in metadata.items()}
        merged = {**(table.schema.metadata or {}), **ours}
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(merged), sink)
        url = self._write(f"part-{self._num_parts:05d}.parquet", sink.getvalue().to_pybytes())
        self._num_parts += 1
        return url

    def write_json(self, name: str, obj: dict) -> str:
        """Write `obj` as `name` (e.g. summary.json) in the folder; its URL."""
        return self._write(name, (json.dumps(obj, indent=2) + "\n").encode())

    def _write(self, name: str, data: bytes) -> str:
        path = f"{self._path}/{name}"
        if is_local(self._fs):  # a rename is atomic here: readers see all of the file or none
            temporary = f"{self._path}/_{name}.{uuid.uuid4().hex}.tmp"
            self._fs.pipe_file(temporary, data)
            self._fs.mv(temporary, path)
        else:  # one PUT: the object appears whole when the upload completes
            self._fs.pipe_file(path, data)
        return to_url(self._fs, path, like=self.url)

    def _entries(self) -> list[str]:
        if not self._fs.isdir(self._path):
            return []
        return [e for e in self._fs.ls(self._path, detail=False) if e.rstrip("/") != self._path]


__all__ = ["RESULT_FIELDS", "OutputFolder", "OutputMode", "completions_to_table", "output_schema"]
