"""The output folder's commit protocol on real filesystems: local, memory://, s3:// (moto)."""

from __future__ import annotations

import json
import uuid

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from prefixbatch.errors import OutputError
from prefixbatch.pipeline.checkpoints import Checkpoints
from prefixbatch.pipeline.commits import (
    CommitRecord,
    OutputFolder,
    indices_to_ranges,
    ranges_to_indices,
    read_committed,
)
from tests.pipeline.test_writer import METADATA, SCHEMA, sample_table

FINGERPRINT = {"model": {"config.json": "abc"}, "input": {"files": []}, "prefixbatch": "0.1.0"}


def commit_part(folder: OutputFolder, rows: list[int], table=None) -> CommitRecord:
    table = sample_table() if table is None else table
    unit, name, size = folder.write_part(table, metadata=METADATA)
    record = CommitRecord(unit, name, indices_to_ranges(rows), table.num_rows, size, {"output_tokens": 1})
    folder.commit(record)
    return record


def names(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_ranges_round_trip():
    rows = [7, 3, 4, 5, 10, 11, 0]
    assert indices_to_ranges(rows) == [[0, 1], [3, 6], [7, 8], [10, 12]]
    assert ranges_to_indices(indices_to_ranges(rows)).tolist() == sorted(rows)
    assert indices_to_ranges([]) == [] and len(ranges_to_indices([])) == 0


def test_mode_error_claims_an_empty_folder_and_refuses_a_non_empty_one(tmp_path):
    url = str(tmp_path / "out")
    folder = OutputFolder(url, mode="error")
    assert len(folder.check(FINGERPRINT)) == 0
    assert not (tmp_path / "out").exists()  # check() writes nothing
    assert len(folder.open(FINGERPRINT)) == 0
    assert names(tmp_path / "out") == ["_job.json"]
    assert json.loads((tmp_path / "out" / "_job.json").read_text()) == FINGERPRINT

    with pytest.raises(OutputError) as e:
        OutputFolder(url, mode="error").open(FINGERPRINT)
    assert str(e.value) == (
        f"output folder {url} is not empty (it holds an interrupted or finished prefixbatch job:"
        " add --resume to finish it); choose an empty folder, or set output.mode: overwrite"
        " (--overwrite) to replace its contents"
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "old.parquet").write_bytes(b"x")
    with pytest.raises(OutputError) as e:
        OutputFolder(str(tmp_path / "other"), mode="error").check(FINGERPRINT)
    # never a suggestion that would delete the user's file
    assert str(e.value) == f"output folder {tmp_path}/other is not empty; choose an empty folder or a new one"


def a_finished_job(tmp_path) -> tuple[str, list[str]]:
    """A folder as a finished job leaves it, plus temporaries of writes that died."""
    url = str(tmp_path / "out")
    folder = OutputFolder(url, mode="error")
    folder.open(FINGERPRINT)
    record = commit_part(folder, [0, 1, 2])
    folder.write_part(sample_table(), metadata=METADATA)  # never committed
    folder.write_json("_summary.json", {"rows": 3})
    folder.mark_success(folder.write_manifest(3, extra={}))
    folder.write_part(sample_table(), metadata=METADATA)  # a stray part written after
    Checkpoints(folder).write({(3, 0): (5, 6, 7)})  # an interrupted run's tokens in flight
    (tmp_path / "out" / f"_{record.part}.{uuid.uuid4().hex}.tmp").write_bytes(b"half")
    (tmp_path / "out" / "_commits" / f"_{record.unit}.json.{uuid.uuid4().hex}.tmp").write_bytes(b"{")
    return url, names(tmp_path / "out")


def test_mode_overwrite_removes_only_what_a_job_wrote(tmp_path):
    url, before = a_finished_job(tmp_path)
    assert len(before) == 9 and "_checkpoints" in before
    (tmp_path / "keep").write_text("outside")
    OutputFolder(f"file://{url}/", mode="overwrite").open(FINGERPRINT)
    assert names(tmp_path / "out") == ["_job.json"]
    assert (tmp_path / "keep").read_text() == "outside"


@pytest.mark.parametrize(
    "foreign",
    [["notes.txt"], ["sub/important.csv"], ["_commits/mine.txt"], ["_checkpoints/x.txt"], ["part-00000.parquet"],
     ["_job.json.bak", ".hidden"]],
)
def test_mode_overwrite_refuses_a_folder_with_foreign_files_and_deletes_nothing(tmp_path, foreign):
    url, _ = a_finished_job(tmp_path)
    for name in foreign:
        (tmp_path / "out" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "out" / name).write_text("the user's")
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob("*"))
    with pytest.raises(OutputError) as e:
        OutputFolder(url, mode="overwrite").open(FINGERPRINT)
    shown = sorted(n if "/" not in n or n.startswith("_c") else n.split("/")[0] + "/" for n in foreign)
    assert str(e.value) == (
        f"output folder {url} holds files that prefixbatch did not write ({', '.join(shown)});"
        " output.mode: overwrite only removes the files of an earlier prefixbatch job, so nothing"
        " was deleted. Choose an empty folder or a new one, or move those files away"
    )
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob("*")) == before
    with pytest.raises(OutputError, match="is not empty; choose an empty folder or a new one$"):
        OutputFolder(url, mode="error").check(FINGERPRINT)  # no --overwrite suggested


def test_mode_overwrite_refuses_a_folder_no_job_wrote(tmp_path):
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "sub" / "important.csv").write_text("a,b")
    (tmp_path / "out" / "part-abc-00000.parquet").write_text("looks like ours, but no _job.json")
    with pytest.raises(OutputError) as e:
        OutputFolder(str(tmp_path / "out"), mode="overwrite").check(FINGERPRINT)
    assert str(e.value).startswith(
        f"output folder {tmp_path}/out has no _job.json, so no prefixbatch job wrote it (notes.txt, sub/);"
        " output.mode: overwrite only removes"
    )
    assert names(tmp_path / "out") == ["notes.txt", "part-abc-00000.parquet", "sub"]
    assert (tmp_path / "out" / "sub" / "important.csv").read_text() == "a,b"


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match=f"output path {tmp_path}/out is a file"):
        OutputFolder(str(tmp_path / "out"), mode="overwrite").open(FINGERPRINT)


def test_parts_are_committed_and_read_through_the_records(tmp_path):
    url = str(tmp_path / "out")
    folder = OutputFolder(url, mode="error")
    folder.open(FINGERPRINT)
    first = commit_part(folder, [0, 1, 2])
    table = sample_table()
    unit, orphan, _ = folder.write_part(table.slice(1), metadata=METADATA)  # never committed
    assert (tmp_path / "out" / orphan).exists()
    assert read_committed(url).equals(table)  # the orphan is not read
    back = pq.read_table(tmp_path / "out" / first.part)
    assert back.schema.remove_metadata() == SCHEMA
    stored = pq.read_metadata(tmp_path / "out" / first.part).metadata
    assert {k: stored[k.encode()].decode() for k in METADATA} == METADATA

    records = folder.write_manifest(3, extra={"job": "t"})
    folder.mark_success(records)
    assert names(tmp_path / "out") == ["_SUCCESS", "_commits", "_job.json", "_manifest.json", first.part]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["parts"] == [{"file": first.part, "rows": 4, "input_rows": 3, "bytes": first.num_bytes}]


def test_manifest_refuses_missing_rows(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"), mode="error")
    folder.open(FINGERPRINT)
    commit_part(folder, [0, 2])
    with pytest.raises(OutputError, match=r"cover 2 of 3 input rows \(1 missing, first: \[1\]\); run again with --resume"):
        folder.write_manifest(3, extra={})
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_resume_keeps_commits_and_removes_what_no_record_names(tmp_path):
    url = str(tmp_path / "out")
    folder = OutputFolder(url, mode="error")
    folder.open(FINGERPRINT)
    kept = commit_part(folder, [0, 1])
    _, orphan, _ = folder.write_part(sample_table(), metadata=METADATA)
    (tmp_path / "out" / f"_part-ab12-00003.parquet.{uuid.uuid4().hex}.tmp").write_bytes(b"half")  # a write that died
    (tmp_path / "out" / "_commits" / f"_ab12-00009.json.{uuid.uuid4().hex}.tmp").write_bytes(b"{")
    duplicate = CommitRecord("ffffffffff-99999", orphan, [[1, 2]], 1, 10)  # covers row 1 again
    (tmp_path / "out" / "_commits" / "ffffffffff-99999.json").write_text(json.dumps(duplicate.__dict__))

    resumed = OutputFolder(url, mode="resume")
    assert len(resumed.check(FINGERPRINT)) == 2
    assert resumed.open(FINGERPRINT).tolist() == [0, 1]
    assert names(tmp_path / "out") == ["_commits", "_job.json", kept.part]
    assert names(tmp_path / "out" / "_commits") == [f"{kept.unit}.json"]
    assert resumed.attempt != folder.attempt
    later = commit_part(resumed, [2])
    assert len({kept.part, later.part}) == 2
    resumed.mark_success(resumed.write_manifest(3, extra={}))
    assert (tmp_path / "out" / "_SUCCESS").exists()


USERS_LOOK_ALIKES = {
    # Named like temporaries, but not of a file a job writes: the user's, never touched.
    "_scratch.tmp/notes.txt": b"the user's folder",
    "_notes.tmp": b"the user's file",
    f"_data.csv.{'0' * 32}.tmp": b"the user's half-written csv",
    f"_commits/_mine.txt.{'1' * 32}.tmp": b"the user's file among the records",
    "_commits/mine.json": b"{}",
    "_checkpoints/keep.txt": b"the user's file among the checkpoints",
}


def plant(folder, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def contents(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_users_look_alike_temporaries_are_never_deleted(tmp_path):
    # A folder holding only a user's `_scratch.tmp/` is not empty: mode error and overwrite refuse it.
    alone = tmp_path / "alone"
    plant(alone, {"_scratch.tmp/notes.txt": b"mine"})
    for mode in ("error", "overwrite"):
        with pytest.raises(OutputError, match="is not empty|has no _job.json"):
            OutputFolder(str(alone), mode=mode).open(FINGERPRINT)
    assert contents(alone) == {"_scratch.tmp/notes.txt": b"mine"}

    # Resumed and finished beside the user's files: every one of them byte for byte.
    url = str(tmp_path / "out")
    folder = OutputFolder(url, mode="error")
    folder.open(FINGERPRINT)
    commit_part(folder, [0])
    Checkpoints(folder).write({(1, 0): (5, 6)})
    plant(tmp_path / "out", USERS_LOOK_ALIKES)
    resumed = OutputFolder(url, mode="resume")
    assert resumed.open(FINGERPRINT).tolist() == [0]
    commit_part(resumed, [1])
    resumed.mark_success(resumed.write_manifest(2, extra={}))
    kept = contents(tmp_path / "out")
    assert {name: kept.get(name) for name in USERS_LOOK_ALIKES} == USERS_LOOK_ALIKES
    assert not any(name.startswith("_checkpoints/") and name.endswith(".json") for name in kept)
    with pytest.raises(OutputError, match="holds files that prefixbatch did not write"):
        OutputFolder(url, mode="overwrite").open(FINGERPRINT)
    assert contents(tmp_path / "out") == kept


def test_resume_refuses_another_jobs_folder(tmp_path):
    url = str(tmp_path / "out")
    OutputFolder(url, mode="error").open(FINGERPRINT)
    changed = {**FINGERPRINT, "model": {"config.json": "def"}, "prefixbatch": "0.2.0"}
    with pytest.raises(OutputError) as e:
        OutputFolder(url, mode="resume").open(changed)
    assert str(e.value) == (
        f"output folder {url} holds the output of a different job, so it cannot be resumed:"
        " model.config.json was 'abc', now 'def'; prefixbatch was '0.1.0', now '0.2.0'. Use"
        " --overwrite to replace it, or choose another folder"
    )
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data.csv").write_text("x")
    with pytest.raises(OutputError, match="has no _job.json, so it was not written by a prefixbatch job"):
        OutputFolder(str(tmp_path / "plain"), mode="resume").check(FINGERPRINT)


def test_resume_into_an_empty_or_missing_folder_starts_fresh(tmp_path):
    folder = OutputFolder(str(tmp_path / "new"), mode="resume")
    assert len(folder.open(FINGERPRINT)) == 0
    assert names(tmp_path / "new") == ["_job.json"]


def test_memory_folder():
    url = f"memory://{uuid.uuid4().hex}/out"
    fs = fsspec.filesystem("memory")
    try:
        folder = OutputFolder(url, mode="error")
        folder.open(FINGERPRINT)
        record = commit_part(folder, [0, 1, 2])
        [part_url] = folder.part_urls([record])
        assert part_url.startswith("memory://") and part_url.endswith(f"/out/{record.part}")
        assert read_committed(url).equals(sample_table())
        with pytest.raises(OutputError, match="is not empty"):
            OutputFolder(url, mode="error").open(FINGERPRINT)
    finally:
        fs.rm(url.rsplit("/", 1)[0], recursive=True)


def test_s3_folder(s3_server):
    bucket = s3_server.create_bucket()
    fs = s3_server.filesystem()
    fs.pipe_file(f"{bucket}/run/stale.txt", b"old")
    url = f"s3://{bucket}/run"
    options = s3_server.storage_options
    with pytest.raises(OutputError, match=f"output folder {url} is not empty"):
        OutputFolder(url, mode="error", storage_options=options).open(FINGERPRINT)

    with pytest.raises(OutputError, match="no prefixbatch job wrote it .stale.txt.; .* nothing was deleted"):
        OutputFolder(url, mode="overwrite", storage_options=options).open(FINGERPRINT)
    fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/run/stale.txt") == b"old"
    fs.rm(f"{bucket}/run/stale.txt")

    folder = OutputFolder(url, mode="overwrite", storage_options=options)
    folder.open(FINGERPRINT)
    first = commit_part(folder, [0, 1, 2])
    _, orphan, _ = folder.write_part(sample_table(), metadata=METADATA)
    resumed = OutputFolder(url, mode="resume", storage_options=options)
    assert resumed.open(FINGERPRINT).tolist() == [0, 1, 2]
    resumed.mark_success(resumed.write_manifest(3, extra={}))
    fs.invalidate_cache()
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/run"))
    assert listed == ["_SUCCESS", "_commits", "_job.json", "_manifest.json", first.part]
    back = read_committed(url, storage_options=options)
    assert back.equals(sample_table()) and back.schema.metadata[b"prefixbatch.job"] == b"demo"
    assert np.array_equal(first.row_indices(), [0, 1, 2])

    OutputFolder(url, mode="overwrite", storage_options=options).open(FINGERPRINT)  # all ours: removed
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/run")] == ["_job.json"]


def test_a_part_is_on_disk_before_its_commit_record_names_it(tmp_path, monkeypatch):
    # What reaches the disk, in order: each file's data (under its temporary name), then its
    # folder (the rename). The record's data is synced only after the part's name is.
    import os as os_module

    synced = []
    real_fsync = os_module.fsync

    def recording_fsync(descriptor):
        synced.append(os_module.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    out = tmp_path / "out"
    folder = OutputFolder(str(out), mode="error")
    folder.open(FINGERPRINT)
    monkeypatch.setattr("prefixbatch.pipeline.commits.os.fsync", recording_fsync)
    record = commit_part(folder, [0, 1, 2])
    shown = [path.replace(str(out), "out").replace(record.part, "PART").replace(record.unit, "UNIT") for path in synced]
    assert [path.rsplit(".", 2)[0] if path.endswith(".tmp") else path for path in shown] == [
        "out/_PART",  # the part's bytes
        "out",  # its name
        "out",  # the new _commits folder's name, held by its parent (first commit only)
        "out/_commits/_UNIT.json",  # the record's bytes
        "out/_commits",  # its name
    ]
