"""Reading the job's input: Parquet files through fsspec, checked before any model work.

Owns expanding the input paths (globs, folders, lists), the job-level checks on every
file's footer (a readable Parquet file, the needed columns present with accepted types, one
type per column across files), streaming the needed columns batch by batch, and the id
checks (no nulls, no duplicates across all files).

Invariants:
- Files are read in sorted, de-duplicated expansion order. A row's global index is its
  position in that order, so the same input always numbers its rows the same way.
- Only the needed columns are read, one row group at a time (`iter_batches`); no file is
  held whole in memory.
- Every batch of a job has one schema, `batch_schema(files, columns)`: ids string or int64,
  prompts string, messages list<struct<role: string, content: string>> (other struct fields
  dropped), sampling override columns in the types of `OVERRIDE_TYPES` (all null where a
  file lacks them), carried columns as stored with dictionaries decoded, each column
  promoted to one type across files.
- Every job-level problem is one `InputError` that lists every bad file.

in: paths / globs + `InputColumns` -> [`InputFile`] -> checked ids, stream of `InputBatch`.
"""

from __future__ import annotations

import bisect
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from prefixbatch.errors import InputError, SpecError
from prefixbatch.pipeline.columns import (
    CARRY_RULE,
    CONTINUATIONS_RULE,
    ID_RULE,
    MESSAGES_RULE,
    MESSAGES_TYPE,
    OVERRIDE_RULES,
    OVERRIDE_TYPES,
    PROMPT_RULE,
    SAMPLING_OVERRIDE_COLUMNS,
    ColumnRule,
    is_string,
)
from prefixbatch.pipeline.openai_batch import UNSUPPORTED, requests_table
from prefixbatch.pipeline.storage import modified_tag, open_fs, to_url

# ---------------------------------------------------------------------------------------
# Plain data


@dataclass(frozen=True)
class InputColumns:
    """Which input columns the job reads, and in which role."""

    id_column: str
    prompt_column: str | None = None  # exactly one of prompt_column / messages_column is set
    messages_column: str | None = None
    carry_columns: tuple[str, ...] = ()  # copied to the output as they are
    override_columns: tuple[str, ...] = ()  # per-row sampling columns, read where present
    continuations_column: str | None = None  # scoring: per row the continuations to score
    openai_batch: bool = False  # OpenAI Batch request files (`openai_batch.requests_table`)

    def __post_init__(self) -> None:
        if (self.prompt_column is None) == (self.messages_column is None):
            given = "neither" if self.prompt_column is None else "both"
            msg = f"exactly one of prompt_column and messages_column must be set, got {given}"
            raise SpecError(msg)
        unknown = [c for c in self.override_columns if c not in OVERRIDE_RULES]
        if unknown:
            msg = f"override columns must be among {list(OVERRIDE_RULES)}, got {unknown}"
            raise SpecError(msg)
        if self.id_column in self.carry_columns:
            msg = f"carry_columns must not name the id column {self.id_column!r} (always written)"
            raise SpecError(msg)

    @property
    def text_column(self) -> str:
        return self.prompt_column or self.messages_column  # type: ignore[return-value]

    def rules(self) -> dict[str, tuple[ColumnRule, bool]]:
        """Column name -> (rule, required), in batch column order; a name's first role wins."""
        text_rule = PROMPT_RULE if self.prompt_column else MESSAGES_RULE
        roles = [(self.id_column, ID_RULE, True), (self.text_column, text_rule, True)]
        if self.continuations_column is not None:
            roles.append((self.continuations_column, CONTINUATIONS_RULE, True))
        if self.openai_batch:
            roles.append((UNSUPPORTED, PROMPT_RULE, True))  # a string (null: the request runs)
        roles += [(c, OVERRIDE_RULES.get(c, CARRY_RULE), True) for c in self.carry_columns]
        roles += [(c, OVERRIDE_RULES[c], False) for c in self.override_columns]
        rules: dict[str, tuple[ColumnRule, bool]] = {}
        for name, rule, required in roles:
            rules.setdefault(name, (rule, required))
        return rules


@dataclass(frozen=True)
class InputFile:
    """One input file, as scanned."""

    url: str  # the expanded path / URL as the user would write it (protocol kept)
    size: int | None
    modified: str | None  # ETag or mtime where the filesystem gives one: for the job fingerprint
    num_rows: int
    first_row_index: int  # global index of this file's first row across the job
    schema: pa.Schema  # the needed columns this file has, as stored (override columns may lack)
    openai_batch: bool = False  # an OpenAI Batch request file (read through `requests_table`)


@dataclass(frozen=True)
class InputBatch:
    """A slice of one file's rows, needed columns only."""

    file: InputFile
    first_row_index: int  # global row index of the batch's first row
    first_file_row: int  # 0-based row number within the file of the batch's first row
    table: pa.Table  # conforms to `batch_schema(files, columns)`

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


# ---------------------------------------------------------------------------------------
# Scanning


def scan_inputs(
    paths: str | Sequence[str],
    columns: InputColumns,
    *,
    storage_options: dict[str, Any] | None = None,
    skipped: list[str] | None = None,
) -> list[InputFile]:
    """Expand the paths and check every file's footer; one `InputError` lists every problem.

    skipped: when given (`input.ignore_corrupt_files`), files that are not readable Parquet
    are left out and described there instead of being problems.
    """
    found = _expand([paths] if isinstance(paths, str) else list(paths), storage_options)
    needed = columns.rules()
    problems: list[str] = []
    files: list[InputFile] = []
    num_unreadable = 0
    for url, fs, path, info in found:
        footer = _read_footer(fs, path, url, columns.openai_batch)
        if isinstance(footer, str):
            num_unreadable += 1
            (problems if skipped is None else skipped).append(footer)
            continue
        num_rows, schema = footer
        problems += _column_problems(url, schema, columns)
        first_row = files[-1].first_row_index + files[-1].num_rows if files else 0
        size, modified = info.get("size"), modified_tag(info)
        needed_schema = pa.schema([f for f in schema if f.name in needed])
        files.append(InputFile(url, size, modified, num_rows, first_row, needed_schema, columns.openai_batch))
    if problems:
        # Only for files that cannot be read at all: a readable file with a wrong column is
        # the spec's or the file's to fix, and skipping it would drop its rows.
        hint = ["(set input.ignore_corrupt_files: true to skip unreadable files)"] if num_unreadable and skipped is None else []
        raise InputError(_listing(f"{len(problems)} problem(s) in the input files:", problems + hint))
    if not files:
        raise InputError(_listing("no readable input files: every file was skipped:", skipped or []))
    batch_schema(files, columns)  # raises if files disagree on a column's type
    return files


def _expand(paths: list[str], storage_options: dict[str, Any] | None) -> list[tuple]:
    """[(url, fs, path, info)] for every data file the paths name: sorted, each file once."""
    if not paths:
        raise InputError("no input paths given")
    found: dict[str, tuple] = {}  # full URL (one spelling per file) -> (url as given, ...)
    missing: list[str] = []
    for given in paths:
        try:
            fs, path = open_fs(given, storage_options)
            matches = _matches(fs, path)
        except (OSError, ValueError, ImportError) as e:  # permissions, credentials, protocol
            missing.append(f"{given}: cannot be listed ({e})")
            continue
        if not matches:
            missing.append(f"{given}: matches no files")
        for match, info in matches.items():
            url = to_url(fs, match, like=given)
            found.setdefault(fs.unstrip_protocol(match), (url, fs, match, info))
    if missing:
        raise InputError(_listing("input paths that name no readable files:", missing))
    return [found[key] for key in sorted(found)]


def _matches(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict]:
    """The files a path names: a glob's matches, a folder's files, or the file itself."""
    if any(c in path for c in "*?["):
        return {p: i for p, i in fs.glob(path, detail=True).items() if _is_data_file(p, i)}
    if not fs.exists(path):
        return {}
    info = fs.info(path)
    if info["type"] == "directory":
        return {p: i for p, i in fs.find(path, detail=True).items() if _is_data_file(p, i)}
    return {path: info}


def _is_data_file(path: str, info: dict) -> bool:
    # Like pyarrow datasets and Spark: "_SUCCESS", ".crc" and friends are not data.
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return info.get("type") == "file" and not name.startswith(("_", "."))


# Text formats by file name; anything else is read as Parquet.
TEXT_FORMATS = {".csv": "CSV", ".jsonl": "JSON Lines", ".ndjson": "JSON Lines", ".json": "JSON Lines"}


def file_format(path: str) -> str:
    """'Parquet', 'CSV' or 'JSON Lines', by the file name (`.csv`, `.jsonl`/`.ndjson`/`.json`)."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    return next((kind for suffix, kind in TEXT_FORMATS.items() if name.endswith(suffix)), "Parquet")


def _read_text(fs: fsspec.AbstractFileSystem, path: str, url: str, openai_batch: bool = False) -> pa.Table:
    """A CSV or JSON Lines file, whole, with pyarrow's readers (types inferred as pyarrow does:
    JSON lists and objects become list and struct columns; CSV holds only scalars); or an
    OpenAI Batch request file, flattened (`openai_batch.requests_table`)."""
    with _open(fs, path) as f:
        if openai_batch:
            return requests_table(f.read().decode("utf-8"), url)
        if file_format(path) == "CSV":
            return pacsv.read_csv(f)
        return pajson.read_json(f)


def _read_footer(
    fs: fsspec.AbstractFileSystem, path: str, url: str, openai_batch: bool = False
) -> tuple[int, pa.Schema] | str:
    """(num_rows, Arrow schema) from the footer alone (Parquet; CSV and JSON Lines are read
    whole), or the problem with the file."""
    kind = "OpenAI Batch request" if openai_batch else file_format(path)
    try:
        if kind != "Parquet":
            table = _read_text(fs, path, url, openai_batch)
            num_rows, schema = table.num_rows, table.schema
        else:
            with _open(fs, path) as f:
                parquet = pq.ParquetFile(f)
                num_rows, schema = parquet.metadata.num_rows, parquet.schema_arrow
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError) as e:
        return f"file {url} is not a readable {kind} file ({e})"
    if not schema.names:
        return f"file {url} has no columns"
    return num_rows, schema


def _open(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    # No read-ahead: Parquet reads the footer and the chosen column chunks by range, and a
    # read-ahead cache would fetch the columns we skip.
    return fs.open(path, "rb", cache_type="none")


def _column_problems(url: str, schema: pa.Schema, columns: InputColumns) -> list[str]:
    problems = []
    for name, (rule, required) in columns.rules().items():
        count = len(schema.get_all_field_indices(name))
        if count == 0 and required:
            close = difflib.get_close_matches(name, schema.names, n=1, cutoff=0.6)
            guess = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"file {url} has no column {name!r} ({guess}columns: {_names(schema)})")
        elif count > 1:
            problems.append(f"file {url} has {count} columns named {name!r}")
        elif count == 1 and not rule.accepts(stored := schema.field(name).type):
            problems.append(f"column {name!r} in {url} must be {rule.expected}, found {stored}")
    return problems


def batch_schema(files: Sequence[InputFile], columns: InputColumns) -> pa.Schema:
    """The schema of every batch of these files: each column's types promoted to one.

    No I/O. Raises `InputError` where files disagree beyond promotion (int32 and int64 become
    int64, int and float become float, an all-null column takes the other files' type).
    """
    fields, conflicts = [], []
    for name, (rule, _required) in columns.rules().items():
        by_file = {
            f.url: rule.batch_type(f.schema.field(name).type)
            for f in files
            if name in f.schema.names
        }
        if not by_file:  # an override column no file has, or no files at all
            fields.append(pa.field(name, OVERRIDE_TYPES.get(name) or rule.batch_type(pa.null())))
            continue
        try:
            single = [pa.schema([pa.field(name, t)]) for t in by_file.values()]
            fields.append(pa.unify_schemas(single, promote_options="permissive").field(name))
        except (pa.ArrowException, TypeError):
            first_url: dict[pa.DataType, str] = {}
            for url, t in by_file.items():
                first_url.setdefault(t, url)
            found = ", ".join(f"{t} in {url}" for t, url in first_url.items())
            conflicts.append(f"column {name!r} has different types across input files: {found}")
    if conflicts:
        raise InputError(_listing("input files disagree on column types:", conflicts))
    return pa.schema(fields)


def _names(schema: pa.Schema, limit: int = 20) -> str:
    names = schema.names
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _listing(header: str, lines: Sequence[str]) -> str:
    return "\n  - ".join([header, *lines])


# ---------------------------------------------------------------------------------------
# Streaming


def iter_input_batches(
    files: Sequence[InputFile],
    columns: InputColumns,
    *,
    storage_options: dict[str, Any] | None = None,
    batch_rows: int = 8192,
    job_files: Sequence[InputFile] | None = None,
) -> Iterator[InputBatch]:
    """Every row of `files` in global row order, at most `batch_rows` rows per batch, in the
    batch schema of `job_files` (all the job's files; default `files`)."""
    schema = batch_schema(job_files or files, columns)
    for file in files:
        yield from _iter_file(file, schema, storage_options, batch_rows)


def _iter_file(
    file: InputFile, schema: pa.Schema, storage_options: dict[str, Any] | None, batch_rows: int
) -> Iterator[InputBatch]:
    fs, path = open_fs(file.url, storage_options)
    if file_format(path) != "Parquet" or file.openai_batch:
        yield from _iter_text_file(file, fs, path, schema, batch_rows, file.openai_batch)
        return
    with _open(fs, path) as f:
        parquet = pq.ParquetFile(f)
        if parquet.metadata.num_rows != file.num_rows:  # row indices would shift under us
            now = parquet.metadata.num_rows
            msg = f"file {file.url} changed since it was scanned ({file.num_rows} rows, now {now})"
            raise InputError(msg)
        present = [n for n in schema.names if n in file.schema.names]
        file_row = 0
        # Row group by row group, so a batch never spans two and memory holds one at most.
        for row_group in range(parquet.num_row_groups):
            batches = parquet.iter_batches(batch_rows, row_groups=[row_group], columns=present)
            for batch in batches:
                table = _conform(batch, schema, file.url)
                yield InputBatch(file, file.first_row_index + file_row, file_row, table)
                file_row += batch.num_rows


def _iter_text_file(
    file: InputFile, fs: fsspec.AbstractFileSystem, path: str, schema: pa.Schema, batch_rows: int,
    openai_batch: bool = False,
) -> Iterator[InputBatch]:
    try:
        table = _read_text(fs, path, file.url, openai_batch)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"file {file.url} is no longer a readable {file_format(path)} file ({e})") from None
    if table.num_rows != file.num_rows:  # row indices would shift under us
        msg = f"file {file.url} changed since it was scanned ({file.num_rows} rows, now {table.num_rows})"
        raise InputError(msg)
    table = table.select([n for n in schema.names if n in table.schema.names])
    file_row = 0
    for batch in table.to_batches(batch_rows):
        yield InputBatch(file, file.first_row_index + file_row, file_row, _conform(batch, schema, file.url))
        file_row += batch.num_rows


def _conform(batch: pa.RecordBatch, schema: pa.Schema, url: str) -> pa.Table:
    """The batch in the job's batch schema; columns the file lacks are all null."""
    arrays = []
    for field in schema:
        if field.name not in batch.schema.names:
            arrays.append(pa.nulls(batch.num_rows, field.type))
            continue
        try:
            arrays.append(_to_type(batch.column(field.name), field.type))
        except pa.ArrowException as e:  # e.g. a uint64 seed beyond int64
            msg = f"column {field.name!r} in {url} cannot be read as {field.type}: {e}"
            raise InputError(msg) from None
    return pa.Table.from_arrays(arrays, schema=schema)


def _to_type(array: pa.Array, target: pa.DataType) -> pa.Array:
    if pa.types.is_list(target) and is_string(array.type):  # stop: "x" -> ["x"]
        array = _one_element_lists(array.cast(pa.string()))
    return array.cast(target)  # a safe cast: out-of-range values raise rather than wrap


def _one_element_lists(strings: pa.Array) -> pa.Array:
    is_valid = pc.is_valid(strings)
    ends = pc.cumulative_sum(pc.cast(is_valid, pa.int32()))
    offsets = pa.concat_arrays([pa.array([0], pa.int32()), ends])
    return pa.ListArray.from_arrays(offsets, strings.drop_null(), mask=pc.invert(is_valid))



# ---------------------------------------------------------------------------------------
# Ids


def check_ids(
    files: Sequence[InputFile],
    columns: InputColumns,
    *,
    storage_options: dict[str, Any] | None = None,
    limit: int = 5,
) -> pa.ChunkedArray:
    """Read the id column alone; raise one `InputError` if any id is null or repeated.

    Returns the ids in global row order (id of row i at index i).
    """
    id_schema = pa.schema([batch_schema(files, columns).field(columns.id_column)])
    chunks = [
        chunk
        for file in files
        for batch in _iter_file(file, id_schema, storage_options, batch_rows=65536)
        for chunk in batch.table.column(0).chunks
    ]
    ids = pa.chunked_array(chunks, type=id_schema.field(0).type)
    problems = _null_ids(ids, files, limit) + _duplicate_ids(ids, files, limit)
    if problems:
        header = (
            f"column {columns.id_column!r} must hold a unique, non-null id on every row across"
            " all input files (rows count from 0):"
        )
        raise InputError(_listing(header, problems))
    return ids


def _null_ids(ids: pa.ChunkedArray, files: Sequence[InputFile], limit: int) -> list[str]:
    rows = pc.indices_nonzero(pc.is_null(ids)).to_pylist()
    lines = [f"null id at {_locate(row, files)}" for row in rows[:limit]]
    return lines + ([f"{len(rows)} null ids in all"] if len(rows) > limit else [])


def _duplicate_ids(ids: pa.ChunkedArray, files: Sequence[InputFile], limit: int) -> list[str]:
    counts = pc.value_counts(ids)
    repeated = pc.and_(pc.greater(counts.field("counts"), 1), pc.is_valid(counts.field("values")))
    values = pc.array_filter(counts.field("values"), repeated)
    # The first repeated ids in row order, each with the rows it is on.
    first = pc.unique(ids.filter(pc.is_in(ids, value_set=values))).slice(0, limit)
    lines = []
    for value in first.to_pylist():
        rows = pc.indices_nonzero(pc.equal(ids, pa.scalar(value, ids.type))).to_pylist()
        more = f" and {len(rows) - limit} more rows" if len(rows) > limit else ""
        lines.append(f"id {value!r} at {', '.join(_locate(r, files) for r in rows[:limit])}{more}")
    return lines + ([f"{len(values)} repeated ids in all"] if len(values) > limit else [])


def _locate(row: int, files: Sequence[InputFile]) -> str:
    """'FILE row N' for a global row index."""
    starts = [f.first_row_index for f in files]
    file = files[bisect.bisect_right(starts, row) - 1]
    return f"{file.url} row {row - file.first_row_index}"


__all__ = [
    "MESSAGES_TYPE",
    "OVERRIDE_TYPES",
    "SAMPLING_OVERRIDE_COLUMNS",
    "InputBatch",
    "InputColumns",
    "InputFile",
    "batch_schema",
    "check_ids",
    "iter_input_batches",
    "scan_inputs",
]
