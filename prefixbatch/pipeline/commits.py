"""The output folder and its commit protocol: every input row in the result exactly once.

A run writes its completions as part files, each covering a set of whole input rows (all
samples of each). A part becomes part of the result only when its *commit record* is
written: one JSON object under `_commits/`, written with one atomic step (a local rename,
or a single object-store PUT), naming the part and the input rows it covers. On a local
filesystem every file is fsync'ed, then its folder, before the next step: a part is on disk
before its record is, so a power loss or host crash never leaves a record naming an empty
part. On an object store the completed PUT is the commit (the store makes it durable). Everything
that reads the result, resumes included, trusts the commit records, never a listing of
part files: a part written by an attempt that died before committing it is ignored and
deleted by the next run.

Layout of a folder:

    _job.json              the job's fingerprint (`jobs.fingerprint`), written first
    _commits/<unit>.json   one commit record per committed part
    _checkpoints/<n>.json  tokens generated so far by rows not yet committed (`checkpoints`)
    part-<unit>.parquet    the parts; <unit> = <attempt tag>-<sequence>, unique per attempt
    _manifest.json         every committed part with its rows (written when all rows are in)
    _summary.json          what the runs did
    _SUCCESS               written last, only when the committed rows are exactly the input's

Invariants:
- A commit record is written after its part is whole, and never rewritten; no two records
  cover the same input row (the writer commits only rows no record covers; `load_records`
  keeps the first record of a row and reports any other as a duplicate).
- `_SUCCESS` exists only if the committed rows are exactly 0..N-1, each once.
- A run in mode `error` refuses a non-empty folder; `overwrite` removes what an earlier
  prefixbatch job wrote there and refuses (deleting nothing) a folder holding anything else;
  `resume` keeps its commits when the fingerprint matches, refuses otherwise. No mode ever
  deletes a file prefixbatch did not write, and no message suggests one that would.

in: Arrow tables + the input rows they cover → committed parts; out: the committed rows.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefixbatch.errors import OutputError
from prefixbatch.faults import fault_point
from prefixbatch.pipeline.storage import is_local, open_fs, to_url

OutputMode = Literal["error", "overwrite", "resume"]

JOB_FILE = "_job.json"
COMMITS = "_commits"
CHECKPOINTS = "_checkpoints"
MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"
SUCCESS = "_SUCCESS"
OPENAI_OUTPUT = "_openai_batch_output.jsonl"  # output.format: openai (`openai_batch.response_lines`)
SIDE_FILES = (JOB_FILE, MANIFEST, SUMMARY, SUCCESS, OPENAI_OUTPUT)

# What a job writes at the top of its folder: side files, parts, and the temporaries of
# `_write` (`_<name>.<32 hex>.tmp`) left by a process that died before its rename.
_PART = re.compile(r"part-[0-9a-f]+-\d+\.parquet")
_TEMPORARY = re.compile(r"_(.+)\.[0-9a-f]{32}\.tmp")
_RECORD = re.compile(r"[0-9a-f]+-\d+\.json")


@dataclass(frozen=True)
class CommitRecord:
    """One committed part: its file, the input rows it covers, and counts for the summary."""

    unit: str
    part: str  # file name inside the folder
    rows: list[list[int]]  # input row indices as sorted, disjoint [start, stop) ranges
    num_output_rows: int
    num_bytes: int
    stats: dict[str, Any] = field(default_factory=dict)  # tokens, errors by code

    def row_indices(self) -> np.ndarray:
        return ranges_to_indices(self.rows)


def indices_to_ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted distinct row indices → [[start, stop), ...], merged where consecutive."""
    values = np.unique(np.fromiter(indices, np.int64))
    if not len(values):
        return []
    breaks = np.flatnonzero(np.diff(values) != 1) + 1
    starts = values[np.r_[0, breaks]]
    stops = values[np.r_[breaks - 1, len(values) - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def committed_rows(records: Sequence[CommitRecord]) -> np.ndarray:
    """Every input row the records cover, sorted."""
    return np.sort(np.concatenate([r.row_indices() for r in records] or [np.zeros(0, np.int64)]))


def ranges_to_indices(ranges: Sequence[Sequence[int]]) -> np.ndarray:
    if not ranges:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(start, stop, dtype=np.int64) for start, stop in ranges])


class OutputFolder:
    """The job's output folder: claimed once per run, then written part by part and committed."""

    def __init__(
        self, url: str, *, mode: OutputMode, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.url = url
        self.mode = mode
        self._fs, path = open_fs(url, storage_options)
        self._path = path.rstrip("/")
        self.attempt = uuid.uuid4().hex[:10]  # names this run's parts: never another's
        self._num_units = 0

    # Claiming -----------------------------------------------------------------------------

    def check(self, fingerprint: dict[str, Any]) -> np.ndarray:
        """Raise `OutputError` if `open()` would refuse; writes nothing. The committed rows a
        resume keeps, sorted (none unless resuming)."""
        if not self._keeps_commits(fingerprint):
            return np.zeros(0, np.int64)
        return committed_rows(self.load_records()[0])

    def refuse_inputs_inside(self, input_urls: Sequence[str], storage_options: dict[str, Any] | None = None) -> None:
        """Raise `OutputError` if any input (a file, a folder, or a glob: what it can match) lies
        in this folder: overwrite would delete it, and resume could remove it as a stray part
        (an earlier output read back as input)."""
        folder = _real(self._fs, self._path)
        for url in input_urls:
            fs, path = open_fs(url, storage_options)
            if fs.protocol != self._fs.protocol:
                continue
            real = _real(fs, _fixed_part(path))
            if real != folder and not _is_inside(real, folder):
                continue
            msg = (
                f"input file {url} is inside the output folder {self.url}: the run would overwrite"
                " or delete its own input, so nothing was written or deleted. Move the input out of"
                " that folder (or copy it), or choose another output folder"
            )
            raise OutputError(msg)

    def _keeps_commits(self, fingerprint: dict[str, Any]) -> bool:
        """The checks of `check`, without reading the commits: whether this run resumes them."""
        if self.mode not in ("error", "overwrite", "resume"):
            msg = f"output.mode must be one of error, overwrite, resume; got {self.mode!r}"
            raise OutputError(msg)
        if not self._path.strip("/"):  # "/" or "s3://": never empty a whole filesystem
            raise OutputError(f"output path {self.url} is a filesystem root; name a folder in it")
        if self._fs.isfile(self._path):
            raise OutputError(f"output path {self.url} is a file; it must be a folder")
        entries = self._entries(with_temporaries=False)
        if self.mode == "error" and entries:
            raise OutputError(self._not_empty_message())
        if self.mode == "overwrite" and entries:
            self._check_only_ours()
        if self.mode == "resume" and entries:
            self._check_same_job(fingerprint)
            return True
        return False

    def _not_empty_message(self) -> str:
        """Why mode `error` refuses the folder, with an option only where it deletes nothing of the user's."""
        if not self._exists(JOB_FILE) or self._foreign_entries():
            return f"output folder {self.url} is not empty; choose an empty folder or a new one"
        return (
            f"output folder {self.url} is not empty (it holds an interrupted or finished prefixbatch"
            " job: add --resume to finish it); choose an empty folder, or set output.mode:"
            " overwrite (--overwrite) to replace its contents"
        )

    def _check_only_ours(self) -> None:
        """Overwrite removes only what a prefixbatch job wrote: refuse any other folder."""
        foreign = self._foreign_entries()
        if not self._exists(JOB_FILE):
            reason = f"has no {JOB_FILE}, so no prefixbatch job wrote it"
        elif foreign:
            reason = "holds files that prefixbatch did not write"
        else:
            return
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        msg = (
            f"output folder {self.url} {reason} ({shown}); output.mode: overwrite only removes"
            " the files of an earlier prefixbatch job, so nothing was deleted. Choose an empty"
            " folder or a new one, or move those files away"
        )
        raise OutputError(msg)

    def _foreign_entries(self) -> list[str]:
        """Names (relative to the folder) of entries no prefixbatch job writes, sorted."""
        foreign = []
        for info in self._fs.ls(self._path, detail=True):
            path = info["name"].rstrip("/")
            if path == self._path:
                continue
            name, is_dir = path.rsplit("/", 1)[-1], info["type"] == "directory"
            if name in (COMMITS, CHECKPOINTS) and is_dir:
                inner = self._fs.ls(path, detail=True)
                foreign += [
                    f"{name}/{n}"
                    for i in inner
                    if (n := i["name"].rstrip("/").rsplit("/", 1)[-1]) and not (i["type"] != "directory" and _is_our_file(n, _RECORD))
                ]
            elif is_dir or not _is_our_file(name, _PART, SIDE_FILES):
                foreign.append(name + ("/" if is_dir else ""))
        return sorted(foreign)

    def open(self, fingerprint: dict[str, Any]) -> np.ndarray:
        """Claim the folder for this run; the input rows already committed (resume), sorted.

        error / overwrite: the folder is empty afterwards but for `_job.json`. resume: the
        commits are kept; parts no record names, duplicate records, leftovers of an
        interrupted write and a stale manifest / `_SUCCESS` are deleted.
        """
        if self._keeps_commits(fingerprint):
            records, stale = self.load_records()
            for path in stale:
                self._fs.rm(path)
            for name in (SUCCESS, MANIFEST, OPENAI_OUTPUT):  # written again when every row is in
                if self._exists(name):
                    self._fs.rm(self._file(name))
            self._remove_unreferenced(records)
            return committed_rows(records)
        for entry in self._entries():  # only ours: `_check_only_ours` refused anything else
            self._fs.rm(entry, recursive=True)
        self._fs.makedirs(self._path, exist_ok=True)
        self.write_json(JOB_FILE, fingerprint)
        return np.zeros(0, np.int64)

    def _check_same_job(self, fingerprint: dict[str, Any]) -> None:
        if not self._exists(JOB_FILE):
            msg = (
                f"output folder {self.url} is not empty and has no {JOB_FILE}, so it was not"
                " written by a prefixbatch job that can be resumed; choose an empty folder or a new one"
            )
            raise OutputError(msg)
        try:
            stored = json.loads(self._fs.cat_file(self._file(JOB_FILE)))
        except (OSError, ValueError) as exc:
            raise OutputError(f"{self._url_of(JOB_FILE)} is unreadable ({exc}); use --overwrite to start over") from exc
        differences = _differences(stored, fingerprint)
        if differences:
            details = "; ".join(differences)
            msg = (
                f"output folder {self.url} holds the output of a different job, so it cannot be"
                f" resumed: {details}. Use --overwrite to replace it, or choose another folder"
            )
            raise OutputError(msg)

    # Parts and commits --------------------------------------------------------------------

    def write_part(self, table: pa.Table, *, metadata: dict[str, str]) -> tuple[str, str, int]:
        """Write a part under a name unique to this attempt: (unit, file name, bytes). Not yet committed."""
        ours = {key.encode(): value.encode() for key, value in metadata.items()}
        merged = {**(table.schema.metadata or {}), **ours}
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(merged), sink)
        data = sink.getvalue().to_pybytes()
        unit = f"{self.attempt}-{self._num_units:05d}"
        self._num_units += 1
        name = f"part-{unit}.parquet"
        self._write(name, data)
        fault_point("part_written")
        return unit, name, len(data)

    def commit(self, record: CommitRecord) -> None:
        """The one atomic step that makes a written part part of the result."""
        self._write(f"{COMMITS}/{record.unit}.json", _json_bytes(asdict(record)))
        fault_point("committed")

    def load_records(self) -> tuple[list[CommitRecord], list[str]]:
        """(the commit records in commit order, paths of duplicate or unreadable records)."""
        directory = self._file(COMMITS)
        if not self._fs.isdir(directory):
            return [], []
        records, stale, covered = [], [], np.zeros(0, np.int64)
        for path in sorted(self._fs.ls(directory, detail=False)):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if _is_temporary(name, _RECORD, ()):  # a temporary of a write that died
                stale.append(path)
                continue
            if not _RECORD.fullmatch(name):  # not a record of ours: never read, never removed
                continue
            try:
                record = CommitRecord(**json.loads(self._fs.cat_file(path)))
            except (OSError, ValueError, TypeError):
                stale.append(path)  # cannot happen with atomic writes; never trust it if it does
                continue
            rows = record.row_indices()
            if np.isin(rows, covered).any():  # a second commit of rows: the first one stands
                stale.append(path)
                continue
            records.append(record)
            covered = np.union1d(covered, rows)
        records.sort(key=lambda r: r.unit)
        return records, stale

    # Finishing ----------------------------------------------------------------------------

    def write_manifest(self, num_input_rows: int, *, extra: dict[str, Any]) -> list[CommitRecord]:
        """Check that the commits cover rows 0..N-1 exactly once, then write `_manifest.json`."""
        records, _ = self.load_records()
        rows = committed_rows(records)
        if not np.array_equal(rows, np.arange(num_input_rows)):
            missing = np.setdiff1d(np.arange(num_input_rows), rows)
            msg = (
                f"the commits in {self.url} cover {len(rows)} of {num_input_rows} input rows"
                f" ({len(missing)} missing, first: {missing[:5].tolist()}); run again with --resume"
            )
            raise OutputError(msg)
        manifest = {
            "parts": [
                {"file": r.part, "rows": r.num_output_rows, "input_rows": len(r.row_indices()), "bytes": r.num_bytes}
                for r in records
            ],
            "input_rows": num_input_rows,
            "output_rows": sum(r.num_output_rows for r in records),
            **extra,
        }
        self.write_json(MANIFEST, manifest)
        fault_point("manifest")
        return records

    def mark_success(self, records: Sequence[CommitRecord]) -> None:
        """Delete what no commit names, then write `_SUCCESS`: the folder is exactly the result."""
        named = {f"{r.unit}.json" for r in records}
        listed = self._fs.ls(self._file(COMMITS), detail=False) if self._fs.isdir(self._file(COMMITS)) else []
        for path in listed:  # duplicates, temporaries
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name not in named and _is_our_file(name, _RECORD):
                self._fs.rm(path)
        self._remove_unreferenced(records)
        self._remove_checkpoints()  # every row is in: nothing is in flight
        self._write(SUCCESS, b"")

    def _remove_checkpoints(self) -> None:
        """Delete the checkpoint files (ours by name) and their folder once it is empty."""
        folder = self._file(CHECKPOINTS)
        if not self._fs.isdir(folder):
            return
        for info in self._fs.ls(folder, detail=True):
            if info["type"] != "directory" and _is_our_file(info["name"].rstrip("/").rsplit("/", 1)[-1], _RECORD):
                self._fs.rm(info["name"])
        if is_local(self._fs) and not self._fs.ls(folder):  # object stores have no empty folders
            self._fs.rmdir(folder)

    def remove_stray_parts(self) -> None:
        """Delete parts no commit names (written by an attempt given up for dead that was
        still running: a worker the scheduler lost but that went on)."""
        records, _ = self.load_records()
        self._remove_unreferenced(records)

    # Files --------------------------------------------------------------------------------

    def write_json(self, name: str, obj: dict) -> str:
        """Write `obj` as `name` in the folder (whole or not at all); its URL."""
        self._write(name, _json_bytes(obj))
        return self._url_of(name)

    def write_file(self, name: str, data: bytes) -> None:
        """Write `name` (a path inside the folder) whole or not at all."""
        self._write(name, data)

    def read_file(self, name: str) -> bytes:
        return self._fs.cat_file(self._file(name))

    def list_files(self, folder: str) -> list[str]:
        """Names (inside the folder) of the files in a sub-folder, sorted; none if it is missing."""
        path = self._file(folder)
        self._fs.invalidate_cache(path)  # another process may have written there (object stores cache listings)
        if not self._fs.isdir(path):
            return []
        return sorted(f"{folder}/{p.rstrip('/').rsplit('/', 1)[-1]}" for p in self._fs.ls(path, detail=False))

    def remove_file(self, name: str) -> None:
        self._fs.rm(self._file(name))

    def read_part(self, record: CommitRecord) -> pa.Table:
        with self._fs.open(self._file(record.part), "rb") as f:
            return pq.read_table(f)

    def part_urls(self, records: Sequence[CommitRecord]) -> list[str]:
        return [self._url_of(r.part) for r in records]

    def _remove_unreferenced(self, records: Sequence[CommitRecord]) -> None:
        """Delete parts no record names and temporaries of interrupted writes; keep the rest."""
        keep = {r.part for r in records} | {JOB_FILE, COMMITS, CHECKPOINTS, *SIDE_FILES}
        for entry in self._entries():
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name in keep or self._fs.isdir(entry):
                continue
            if _is_our_file(name, _PART, SIDE_FILES):  # a stray part, or a temporary of ours; never a user's file
                self._fs.rm(entry)

    def _write(self, name: str, data: bytes) -> None:
        fault_point("write")
        path = self._file(name)
        try:
            if is_local(self._fs):
                self._write_durably(path, data)
            else:  # one PUT: the object appears whole when the upload completes
                self._fs.pipe_file(path, data)
        except OSError as exc:
            msg = (
                f"writing {self._url_of(name)} failed ({exc}); what was committed before is kept:"
                " run the job again with --resume to finish it"
            )
            raise OutputError(msg) from exc

    def _write_durably(self, path: str, data: bytes) -> None:
        """Write a local file whole or not at all, on disk before this returns: the data is
        fsync'ed under a temporary name, renamed into place (atomic: readers see all of the
        file or none), then its folder is fsync'ed so the name survives a power loss too. A
        commit record written after a part therefore never reaches the disk before the part."""
        folder, base = path.rsplit("/", 1)
        if not self._fs.isdir(folder):
            self._fs.makedirs(folder, exist_ok=True)
            _fsync(folder.rsplit("/", 1)[0])  # the new folder's own name
        temporary = f"{folder}/_{base}.{uuid.uuid4().hex}.tmp"
        self._fs.pipe_file(temporary, data)
        _fsync(temporary)
        self._fs.mv(temporary, path)
        _fsync(folder)

    def _file(self, name: str) -> str:
        return f"{self._path}/{name}"

    def _url_of(self, name: str) -> str:
        return to_url(self._fs, self._file(name), like=self.url)

    def _exists(self, name: str) -> bool:
        return bool(self._fs.exists(self._file(name)))

    def _entries(self, *, with_temporaries: bool = True) -> list[str]:
        if not self._fs.isdir(self._path):
            return []
        listed = [e for e in self._fs.ls(self._path, detail=True) if e["name"].rstrip("/") != self._path]
        if with_temporaries:
            return [e["name"] for e in listed]
        return [e["name"] for e in listed if e["type"] == "directory" or not _is_temporary(e["name"].rstrip("/").rsplit("/", 1)[-1])]


def _is_our_file(name: str, pattern: re.Pattern, names: Sequence[str] = ()) -> bool:
    """A file name a prefixbatch job writes: one of `names`, a match of `pattern`, or a
    temporary of one of those."""
    if name in names or pattern.fullmatch(name):
        return True
    temporary = _TEMPORARY.fullmatch(name)
    return bool(temporary) and _is_our_file(temporary.group(1), pattern, names)


def _is_temporary(name: str, pattern: re.Pattern = _PART, names: Sequence[str] = SIDE_FILES) -> bool:
    """A file `_write` had not yet renamed into place when its process died: exactly
    `_<one of our names>.<32 hex>.tmp`, never merely any `_*.tmp` (that may be the user's)."""
    temporary = _TEMPORARY.fullmatch(name)
    return bool(temporary) and _is_our_file(temporary.group(1), pattern, names)


def _fsync(path: str) -> None:
    """Flush a local file's data, or a folder's entries, to the disk (any descriptor will do)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _real(fs: Any, path: str) -> str:
    """The path with links resolved where the filesystem has them (local), as it is elsewhere."""
    return os.path.realpath(path) if is_local(fs) else path.rstrip("/")


def _fixed_part(path: str) -> str:
    """A glob's folder before its first wildcard (`out/part-*.parquet` → `out`); a plain path as it is."""
    cuts = [path.index(c) for c in "*?[" if c in path]
    return path if not cuts else path[: min(cuts)].rsplit("/", 1)[0]


def _is_inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def read_committed(url: str, *, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Every committed row of an output folder (finished or not), part by part in commit order.

    Reads what the commit records name, never a listing: parts of attempts that died before
    committing are not read, even while they are still in the folder.
    """
    folder = OutputFolder(url, mode="resume", storage_options=storage_options)
    tables = [folder.read_part(record) for record in folder.load_records()[0]]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables)


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


_ABSENT = "(not set)"


def _differences(stored: dict, now: dict, prefix: str = "") -> list[str]:
    """Each field (dotted, down to the leaves) whose value differs: `field was X, now Y`."""
    lines = []
    for key in sorted(set(stored) | set(now), key=str):
        old, new = stored.get(key, _ABSENT), now.get(key, _ABSENT)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key} was {_shown(old)}, now {_shown(new)}")
    return lines


def _shown(value: Any, limit: int = 120) -> str:
    text = value if value is _ABSENT else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "CHECKPOINTS",
    "COMMITS",
    "JOB_FILE",
    "MANIFEST",
    "SUCCESS",
    "SUMMARY",
    "CommitRecord",
    "OutputFolder",
    "OutputMode",
    "committed_rows",
    "indices_to_ranges",
    "ranges_to_indices",
    "read_committed",
]
