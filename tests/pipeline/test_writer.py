"""Writer: output schema, completions -> table, folder modes, part files; real filesystems."""

from __future__ import annotations

import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixbatch.errors import OutputError, SpecError
from prefixbatch.pipeline.writer import OutputFolder, completions_to_table, output_schema
from prefixbatch.types import Completion, error_completion

METADATA = {
    "prefixbatch.job": "demo",
    "prefixbatch.model": "/models/tiny",
    "prefixbatch.version": "0.1.0",
}
SCHEMA = output_schema(pa.string(), [pa.field("topic", pa.string())], id_column="qid")


def sample_table() -> pa.Table:
    completions = [
        Completion(0, (5, 6), "hi there", "stop", num_prompt_tokens=4, num_cached_prompt_tokens=3),
        error_completion(
            1, "prompt_too_long", "4096 tokens, the model takes 2048", num_prompt_tokens=4096
        ),
        Completion(2, (7,), "ok", "length", num_prompt_tokens=2),
        Completion(2, (8, 9), "no", "stop", num_prompt_tokens=2, sample_index=1),
    ]
    ids = pa.array(["a", "b", "c", "c"], pa.large_string())  # cast to the schema's string
    carry = pa.table({"topic": ["x", None, "z", "z"]})
    return completions_to_table(completions, ids=ids, carry=carry, schema=SCHEMA)


def test_output_schema_is_id_then_carry_then_results():
    expected = pa.schema(
        [
            pa.field("qid", pa.string()),
            pa.field("topic", pa.string()),
            pa.field("sample_index", pa.int32(), nullable=False),
            pa.field("output_text", pa.string()),
            pa.field("output_token_ids", pa.list_(pa.int32())),
            pa.field("finish_reason", pa.string(), nullable=False),
            pa.field("num_prompt_tokens", pa.int32(), nullable=False),
            pa.field("num_output_tokens", pa.int32(), nullable=False),
            pa.field("num_cached_prompt_tokens", pa.int32(), nullable=False),
            pa.field("error", pa.string()),
        ]
    )
    assert expected == SCHEMA


def test_output_schema_refuses_repeated_column_names():
    with pytest.raises(SpecError, match=r"output columns would repeat \['error'\]"):
        output_schema(pa.int64(), [pa.field("error", pa.string())], id_column="id")


def test_completions_to_table_values():
    table = sample_table()
    assert table.schema == SCHEMA
    assert table.to_pydict() == {
        "qid": ["a", "b", "c", "c"],
        "topic": ["x", None, "z", "z"],
        "sample_index": [0, 0, 0, 1],
        "output_text": ["hi there", None, "ok", "no"],
        "output_token_ids": [[5, 6], None, [7], [8, 9]],
        "finish_reason": ["stop", "error", "length", "stop"],
        "num_prompt_tokens": [4, 4096, 2, 2],
        "num_output_tokens": [2, 0, 1, 2],
        "num_cached_prompt_tokens": [3, 0, 0, 0],
        "error": [None, "prompt_too_long: 4096 tokens, the model takes 2048", None, None],
    }


def test_completions_to_table_without_carry_and_empty():
    schema = output_schema(pa.int64(), [], id_column="id")
    table = completions_to_table([], ids=pa.array([], pa.int64()), carry=None, schema=schema)
    assert table.schema == schema and table.num_rows == 0


# --- the folder -----------------------------------------------------------------------------


def test_mode_error_creates_a_missing_folder_and_refuses_a_non_empty_one(tmp_path):
    url = str(tmp_path / "out")
    folder = OutputFolder(url, mode="error")
    folder.check()
    assert not (tmp_path / "out").exists()  # check() writes nothing
    folder.prepare()
    assert (tmp_path / "out").is_dir()
    OutputFolder(url, mode="error").prepare()  # empty: fine

    (tmp_path / "out" / "old.parquet").write_bytes(b"x")
    with pytest.raises(OutputError) as e:
        OutputFolder(url, mode="error").prepare()
    assert str(e.value) == (
        f"output folder {url} is not empty; choose an empty folder, or set output.mode: overwrite"
        " to replace its contents"
    )
    assert (tmp_path / "out" / "old.parquet").exists()


def test_mode_overwrite_clears_the_folder(tmp_path):
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "sub" / "x").write_text("x")
    (tmp_path / "out" / "part-00000.parquet").write_text("old")
    (tmp_path / "keep").write_text("outside")
    folder = OutputFolder(f"file://{tmp_path}/out/", mode="overwrite")
    folder.prepare()
    assert list((tmp_path / "out").iterdir()) == []
    assert (tmp_path / "keep").read_text() == "outside"


def test_mode_resume_is_not_supported_yet(tmp_path):
    with pytest.raises(OutputError, match=r"output\.mode: resume is not supported yet"):
        OutputFolder(str(tmp_path), mode="resume").prepare()


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match=f"output path {tmp_path}/out is a file"):
        OutputFolder(str(tmp_path / "out"), mode="overwrite").prepare()


def test_parts_round_trip_with_schema_and_metadata(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"), mode="error")
    folder.prepare()
    table = sample_table()
    urls = [
        folder.write_part(table, metadata=METADATA),
        folder.write_part(table.slice(1), metadata=METADATA),
    ]
    assert urls == [f"{tmp_path}/out/part-00000.parquet", f"{tmp_path}/out/part-00001.parquet"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    back = pq.read_table(urls[0])
    assert back.schema.remove_metadata() == SCHEMA
    assert back.equals(table)
    stored = pq.read_metadata(urls[1]).metadata
    assert {k: stored[k.encode()].decode() for k in METADATA} == METADATA
    assert pq.read_table(urls[1]).num_rows == 3


def test_write_json(tmp_path):
    folder = OutputFolder(str(tmp_path), mode="overwrite")
    url = folder.write_json("summary.json", {"rows": 3, "parts": ["a"]})
    assert url == f"{tmp_path}/summary.json"
    assert json.loads((tmp_path / "summary.json").read_text()) == {"rows": 3, "parts": ["a"]}


def test_memory_folder():
    url = f"memory://{uuid.uuid4().hex}/out"
    fs = fsspec.filesystem("memory")
    try:
        folder = OutputFolder(url, mode="error")
        folder.prepare()
        part = folder.write_part(sample_table(), metadata=METADATA)
        assert part.startswith("memory://") and part.endswith("/out/part-00000.parquet")
        with fs.open(part, "rb") as f:
            assert pq.read_table(f).equals(sample_table())
        with pytest.raises(OutputError, match="is not empty"):
            OutputFolder(url, mode="error").prepare()
    finally:
        fs.rm(url.rsplit("/", 1)[0], recursive=True)


def test_s3_folder(s3_server):
    bucket = s3_server.create_bucket()
    fs = s3_server.filesystem()
    fs.pipe_file(f"{bucket}/run/stale.txt", b"old")
    url = f"s3://{bucket}/run"
    options = s3_server.storage_options
    with pytest.raises(OutputError, match=f"output folder {url} is not empty"):
        OutputFolder(url, mode="error", storage_options=options).prepare()

    folder = OutputFolder(url, mode="overwrite", storage_options=options)
    folder.prepare()
    part = folder.write_part(sample_table(), metadata=METADATA)
    summary = folder.write_json("summary.json", {"rows": 3})
    assert (part, summary) == (f"{url}/part-00000.parquet", f"{url}/summary.json")
    fs.invalidate_cache()
    assert sorted(fs.ls(f"{bucket}/run")) == [
        f"{bucket}/run/part-00000.parquet",
        f"{bucket}/run/summary.json",
    ]
    with fs.open(part, "rb") as f:
        back = pq.read_table(f)
    assert back.equals(sample_table())
    assert back.schema.metadata[b"prefixbatch.job"] == b"demo"
    assert json.loads(fs.cat_file(summary)) == {"rows": 3}
