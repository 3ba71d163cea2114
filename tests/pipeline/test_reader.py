"""Reader: expansion, footer checks, streaming, type rules and id checks on real Parquet files."""

from __future__ import annotations

import os
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixbatch.errors import InputError, SpecError
from prefixbatch.pipeline.reader import (
    MESSAGES_TYPE,
    SAMPLING_OVERRIDE_COLUMNS,
    InputColumns,
    batch_schema,
    check_ids,
    iter_input_batches,
    scan_inputs,
)

COLUMNS = InputColumns(id_column="id", prompt_column="prompt")


def write(path, **columns) -> str:
    pq.write_table(pa.table(columns), str(path))
    return str(path)


def prompts(ids, prefix="p") -> dict:
    return {"id": ids, "prompt": [f"{prefix}{i}" for i in ids]}


def read_all(files, columns=COLUMNS, **kwargs) -> pa.Table:
    return pa.concat_tables(b.table for b in iter_input_batches(files, columns, **kwargs))


def input_error(paths, columns=COLUMNS, **kwargs) -> str:
    with pytest.raises(InputError) as e:
        files = scan_inputs(paths, columns, **kwargs)
        check_ids(files, columns, **kwargs)
    return str(e.value)


# --- where the files are ------------------------------------------------------------------


def test_local_path(tmp_path):
    path = write(tmp_path / "a.parquet", **prompts([1, 2, 3]), extra=["x", "y", "z"])
    [file] = scan_inputs(path, COLUMNS)
    assert (file.url, file.num_rows, file.first_row_index) == (path, 3, 0)
    assert file.size == os.path.getsize(path)
    assert file.modified is not None
    table = read_all([file])
    assert table.column_names == ["id", "prompt"]  # only the needed columns
    assert table.to_pydict() == {"id": [1, 2, 3], "prompt": ["p1", "p2", "p3"]}


def test_file_url_keeps_its_protocol(tmp_path):
    write(tmp_path / "a.parquet", **prompts([1]))
    [file] = scan_inputs(f"file://{tmp_path}/a.parquet", COLUMNS)
    assert file.url == f"file://{tmp_path}/a.parquet"
    assert read_all([file]).column("id").to_pylist() == [1]


def test_glob_and_list_are_sorted_and_deduplicated(tmp_path):
    write(tmp_path / "b.parquet", **prompts([3, 4]))
    write(tmp_path / "a.parquet", **prompts([1, 2]))
    by_glob = scan_inputs(str(tmp_path / "*.parquet"), COLUMNS)
    by_list = scan_inputs(
        [str(tmp_path / "b.parquet"), str(tmp_path / "a.parquet"), str(tmp_path / "*.parquet")],
        COLUMNS,
    )
    assert by_glob == by_list
    assert [(f.url.rsplit("/", 1)[1], f.first_row_index) for f in by_glob] == [
        ("a.parquet", 0),
        ("b.parquet", 2),
    ]
    assert read_all(by_glob).column("id").to_pylist() == [1, 2, 3, 4]


def test_folder_reads_its_data_files_and_skips_markers(tmp_path):
    write(tmp_path / "part-1.parquet", **prompts([2]))
    write(tmp_path / "part-0.parquet", **prompts([1]))
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".part-0.parquet.crc").write_text("crc")
    files = scan_inputs(str(tmp_path), COLUMNS)
    assert [f.url.rsplit("/", 1)[1] for f in files] == ["part-0.parquet", "part-1.parquet"]


def test_memory_filesystem():
    name = uuid.uuid4().hex
    root = f"memory://{name}"
    fs = fsspec.filesystem("memory")
    for file_name, ids in [("b.parquet", [3]), ("a.parquet", [1, 2])]:
        with fs.open(f"{root}/{file_name}", "wb") as f:
            pq.write_table(pa.table(prompts(ids)), f)
    try:
        files = scan_inputs(f"{root}/*.parquet", COLUMNS)
        assert [f.url for f in files] == [
            f"memory:///{name}/a.parquet",
            f"memory:///{name}/b.parquet",
        ]
        assert read_all(files).column("id").to_pylist() == [1, 2, 3]
    finally:
        fs.rm(root, recursive=True)


def test_s3(s3_server):
    bucket = s3_server.create_bucket()
    fs = s3_server.filesystem()
    for name, ids in [("in/b.parquet", [3, 4]), ("in/a.parquet", [1, 2])]:
        with fs.open(f"{bucket}/{name}", "wb") as f:
            pq.write_table(pa.table(prompts(ids)), f)
    options = s3_server.storage_options
    files = scan_inputs(f"s3://{bucket}/in/*.parquet", COLUMNS, storage_options=options)
    assert [f.url for f in files] == [f"s3://{bucket}/in/a.parquet", f"s3://{bucket}/in/b.parquet"]
    assert all(f.modified for f in files)  # the ETag: part of the job fingerprint
    assert check_ids(files, COLUMNS, storage_options=options).to_pylist() == [1, 2, 3, 4]
    batches = list(iter_input_batches(files, COLUMNS, storage_options=options))
    assert [(b.first_row_index, b.table.column("id").to_pylist()) for b in batches] == [
        (0, [1, 2]),
        (2, [3, 4]),
    ]


# --- streaming ------------------------------------------------------------------------------


def test_row_groups_stream_as_batches_with_global_row_indices(tmp_path):
    first = tmp_path / "a.parquet"
    pq.write_table(pa.table(prompts(list(range(7)))), first, row_group_size=3)
    write(tmp_path / "b.parquet", **prompts([7, 8]))
    files = scan_inputs(str(tmp_path / "*.parquet"), COLUMNS)
    batches = list(iter_input_batches(files, COLUMNS, batch_rows=100))
    assert [(b.file.url, b.first_row_index, b.first_file_row, b.num_rows) for b in batches] == [
        (str(first), 0, 0, 3),
        (str(first), 3, 3, 3),
        (str(first), 6, 6, 1),
        (str(tmp_path / "b.parquet"), 7, 0, 2),
    ]
    for batch in batches:  # row index i holds the row with id i
        ids = batch.table.column("id").to_pylist()
        assert ids == list(range(batch.first_row_index, batch.first_row_index + batch.num_rows))
    assert [b.num_rows for b in iter_input_batches(files, COLUMNS, batch_rows=2)] == [
        2,
        1,
        2,
        1,
        1,
        2,
    ]


def test_empty_file_is_fine(tmp_path):
    write(tmp_path / "a.parquet", id=pa.array([], pa.int64()), prompt=pa.array([], pa.string()))
    write(tmp_path / "b.parquet", **prompts([5]))
    files = scan_inputs(str(tmp_path / "*.parquet"), COLUMNS)
    assert [(f.num_rows, f.first_row_index) for f in files] == [(0, 0), (1, 0)]
    assert read_all(files).column("id").to_pylist() == [5]
    assert check_ids(files, COLUMNS).to_pylist() == [5]


# --- job-level errors -----------------------------------------------------------------------


def test_paths_that_match_nothing_are_all_named(tmp_path):
    write(tmp_path / "a.parquet", **prompts([1]))
    message = input_error(
        [str(tmp_path / "a.parquet"), str(tmp_path / "nope.parquet"), str(tmp_path / "*.pq")]
    )
    assert f"{tmp_path}/nope.parquet: matches no files" in message
    assert f"{tmp_path}/*.pq: matches no files" in message
    assert "a.parquet" not in message


def test_missing_column_names_file_and_columns(tmp_path):
    path = write(tmp_path / "a.parquet", id=[1], text=["hi"])
    assert f"file {path} has no column 'prompt' (columns: id, text)" in input_error(path)


def test_wrong_types_name_column_file_expected_and_found(tmp_path):
    path = write(tmp_path / "a.parquet", id=[1.5], prompt=[7])
    message = input_error(path)
    assert f"column 'id' in {path} must be a string or an integer, found double" in message
    assert f"column 'prompt' in {path} must be a string, found int64" in message


def test_every_bad_file_is_listed_in_one_message(tmp_path):
    good = write(tmp_path / "a.parquet", **prompts([1]))
    (tmp_path / "b.parquet").write_text("id,prompt\n1,hello\n")
    no_prompt = write(tmp_path / "c.parquet", id=[2])
    message = input_error(str(tmp_path / "*.parquet"))
    assert message.startswith("2 problem(s) in the input files:")
    assert f"file {tmp_path}/b.parquet is not a readable Parquet file" in message
    assert f"file {no_prompt} has no column 'prompt' (columns: id)" in message
    assert good not in message


def test_carry_types_are_promoted_across_files_or_reported(tmp_path):
    columns = InputColumns(id_column="id", prompt_column="prompt", carry_columns=("score",))
    write(tmp_path / "a.parquet", **prompts([1]), score=pa.array([1], pa.int32()))
    write(tmp_path / "b.parquet", **prompts([2]), score=pa.array([None], pa.null()))
    write(tmp_path / "c.parquet", **prompts([3]), score=pa.array([3], pa.int64()))
    files = scan_inputs(str(tmp_path / "*.parquet"), columns)
    table = read_all(files, columns)
    assert table.schema.field("score").type == pa.int64()
    assert table.column("score").to_pylist() == [1, None, 3]

    write(tmp_path / "d.parquet", **prompts([4]), score=["high"])
    message = input_error(str(tmp_path / "*.parquet"), columns)
    assert "column 'score' has different types across input files:" in message
    assert f"int32 in {tmp_path}/a.parquet" in message
    assert f"string in {tmp_path}/d.parquet" in message


def test_ids_of_different_kinds_across_files_are_reported(tmp_path):
    write(tmp_path / "a.parquet", **prompts([1]))
    write(tmp_path / "b.parquet", **prompts(["x"]))
    message = input_error(str(tmp_path / "*.parquet"))
    assert "column 'id' has different types across input files" in message


# --- accepted types ---------------------------------------------------------------------------


def test_dictionary_and_large_strings_read_as_strings(tmp_path):
    columns = InputColumns(id_column="id", prompt_column="prompt", carry_columns=("tag",))
    write(
        tmp_path / "a.parquet",
        id=pa.array(["a", "b"]).dictionary_encode(),
        prompt=pa.array(["x", None], pa.large_string()),
        tag=pa.array(["t", "t"]).dictionary_encode(),
    )
    write(tmp_path / "b.parquet", id=["c"], prompt=pa.array(["y"]).dictionary_encode(), tag=["u"])
    files = scan_inputs(str(tmp_path / "*.parquet"), columns)
    table = read_all(files, columns)
    assert table.schema == pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("tag", pa.string())]
    )
    assert table.to_pydict() == {
        "id": ["a", "b", "c"],
        "prompt": ["x", None, "y"],
        "tag": ["t", "t", "u"],
    }


def test_integer_ids_of_any_width_read_as_int64(tmp_path):
    write(tmp_path / "a.parquet", id=pa.array([1], pa.int16()), prompt=["x"])
    write(tmp_path / "b.parquet", id=pa.array([2], pa.uint32()), prompt=["y"])
    files = scan_inputs(str(tmp_path / "*.parquet"), COLUMNS)
    ids = check_ids(files, COLUMNS)
    assert ids.type == pa.int64()
    assert ids.to_pylist() == [1, 2]


MESSAGES = InputColumns(id_column="id", messages_column="messages")


def test_messages_column_reads_role_and_content(tmp_path):
    stored = pa.large_list(
        pa.struct(
            [
                ("name", pa.string()),
                ("role", pa.dictionary(pa.int8(), pa.string())),
                ("content", pa.large_string()),
            ]
        )
    )
    chat = [
        [
            {"name": "n", "role": "system", "content": "be brief"},
            {"name": None, "role": "user", "content": "hi"},
        ]
    ]
    path = write(tmp_path / "a.parquet", id=["a"], messages=pa.array(chat, stored))
    table = read_all(scan_inputs(path, MESSAGES), MESSAGES)
    assert table.schema.field("messages").type == MESSAGES_TYPE
    assert table.column("messages").to_pylist() == [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ]


@pytest.mark.parametrize(
    "messages",
    [
        pa.array([["hi"]]),
        pa.array([[{"role": "user"}]]),
        pa.array([[{"role": 1, "content": "hi"}]]),
        pa.array([{"role": "user", "content": "hi"}]),
    ],
    ids=["list-of-strings", "no-content", "int-role", "not-a-list"],
)
def test_messages_column_of_the_wrong_shape(tmp_path, messages):
    path = write(tmp_path / "a.parquet", id=["a"], messages=messages)
    expected = "a list of structs with string fields 'role' and 'content'"
    found = pq.read_schema(path).field("messages").type  # as stored: list items named "element"
    assert f"column 'messages' in {path} must be {expected}, found {found}" in input_error(
        path, MESSAGES
    )


OVERRIDES = InputColumns(
    id_column="id", prompt_column="prompt", override_columns=SAMPLING_OVERRIDE_COLUMNS
)


def test_override_columns_are_read_where_present_and_null_elsewhere(tmp_path):
    write(
        tmp_path / "a.parquet",
        **prompts([1, 2]),
        temperature=pa.array([1, None], pa.int32()),
        stop=["###", None],
        seed=pa.array([7, 8], pa.uint8()),
        stop_token_ids=pa.array([[1, 2], []], pa.list_(pa.int32())),
    )
    write(
        tmp_path / "b.parquet",
        **prompts([3]),
        stop=[["a", "b"]],
        max_tokens=[5],
        n=pa.array([3], pa.int8()),
    )
    files = scan_inputs(str(tmp_path / "*.parquet"), OVERRIDES)
    table = read_all(files, OVERRIDES)
    assert table.schema == pa.schema(
        [
            ("id", pa.int64()),
            ("prompt", pa.string()),
            ("max_tokens", pa.int64()),
            ("temperature", pa.float64()),
            ("top_p", pa.float64()),
            ("top_k", pa.int64()),
            ("seed", pa.int64()),
            ("stop", pa.list_(pa.string())),
            ("stop_token_ids", pa.list_(pa.int64())),
            ("n", pa.int64()),
            ("repetition_penalty", pa.float64()),
            ("presence_penalty", pa.float64()),
            ("frequency_penalty", pa.float64()),
            ("min_tokens", pa.int64()),
            ("min_p", pa.float64()),
            ("logit_bias", pa.string()),
            ("logprobs", pa.int64()),
            ("prompt_logprobs", pa.int64()),
            ("json_schema", pa.string()),
            ("regex", pa.string()),
            ("choice", pa.list_(pa.string())),
        ]
    )
    assert table.to_pydict() == {
        "id": [1, 2, 3],
        "prompt": ["p1", "p2", "p3"],
        "max_tokens": [None, None, 5],
        "temperature": [1.0, None, None],
        "top_p": [None, None, None],
        "top_k": [None, None, None],
        "seed": [7, 8, None],
        "stop": [["###"], None, ["a", "b"]],
        "stop_token_ids": [[1, 2], [], None],
        "n": [None, None, 3],
        **{name: [None, None, None] for name in ("repetition_penalty", "presence_penalty", "frequency_penalty",
                                                  "min_tokens", "min_p", "logit_bias", "logprobs", "prompt_logprobs", "json_schema",
                                                  "regex", "choice")},
    }
    assert batch_schema(files, OVERRIDES) == table.schema


@pytest.mark.parametrize(
    ("name", "values", "expected"),
    [
        ("max_tokens", [1.5], "an integer"),
        ("temperature", ["hot"], "a float or an integer"),
        ("top_k", [1.0], "an integer"),
        ("stop", [[1]], "a string or a list of strings"),
        ("stop_token_ids", [1], "a list of integers"),
        ("n", ["x"], "an integer"),
        ("n", [2.0], "an integer"),
    ],
)
def test_override_column_of_the_wrong_type(tmp_path, name, values, expected):
    path = write(tmp_path / "a.parquet", **prompts([1]), **{name: values})
    found = pq.read_schema(path).field(name).type
    assert f"column {name!r} in {path} must be {expected}, found {found}" in input_error(
        path, OVERRIDES
    )


def test_input_columns_need_exactly_one_text_column():
    with pytest.raises(SpecError, match="exactly one of prompt_column and messages_column"):
        InputColumns(id_column="id")
    with pytest.raises(SpecError, match="exactly one of prompt_column and messages_column"):
        InputColumns(id_column="id", prompt_column="p", messages_column="m")
    with pytest.raises(SpecError, match="override columns must be among"):
        InputColumns(id_column="id", prompt_column="p", override_columns=("temprature",))


# --- ids --------------------------------------------------------------------------------------


def test_duplicate_and_null_ids_across_files_name_file_and_row(tmp_path):
    a = write(tmp_path / "a.parquet", id=["x", "y", None], prompt=["1", "2", "3"])
    b = write(tmp_path / "b.parquet", id=["z", "x", "y", "x"], prompt=["4", "5", "6", "7"])
    message = input_error(str(tmp_path / "*.parquet"))
    assert (
        "column 'id' must hold a unique, non-null id on every row across all input files" in message
    )
    assert f"null id at {a} row 2" in message
    assert f"id 'x' at {a} row 0, {b} row 1, {b} row 3" in message
    assert f"id 'y' at {a} row 1, {b} row 2" in message


def test_many_bad_ids_are_counted_after_the_first_five(tmp_path):
    ids = [i // 2 for i in range(20)] + [None] * 7  # ten ids twice each, seven nulls
    path = write(tmp_path / "a.parquet", **{"id": ids, "prompt": ["p"] * len(ids)})
    message = input_error(path)
    assert message.count("null id at") == 5
    assert "7 null ids in all" in message
    assert message.count("\n  - id ") == 5
    assert f"id 0 at {path} row 0, {path} row 1" in message
    assert "10 repeated ids in all" in message


def test_check_ids_returns_ids_in_row_order(tmp_path):
    write(tmp_path / "a.parquet", **prompts(["b", "a"]))
    write(tmp_path / "b.parquet", **prompts(["c"]))
    files = scan_inputs(str(tmp_path / "*.parquet"), COLUMNS)
    assert check_ids(files, COLUMNS).to_pylist() == ["b", "a", "c"]


def test_one_file_spelled_two_ways_is_read_once(tmp_path):
    path = write(tmp_path / "a.parquet", **prompts([1]))
    files = scan_inputs([path, f"file://{path}", str(tmp_path / "*.parquet")], COLUMNS)
    assert [f.url for f in files] == [path]


def test_unknown_protocol_is_an_input_error():
    assert "nope://bucket/x.parquet: cannot be listed" in input_error("nope://bucket/x.parquet")


def test_no_rows_at_all(tmp_path):
    path = write(
        tmp_path / "a.parquet", id=pa.array([], pa.string()), prompt=pa.array([], pa.string())
    )
    files = scan_inputs(path, COLUMNS)
    assert check_ids(files, COLUMNS).to_pylist() == []
    assert list(iter_input_batches(files, COLUMNS)) == []
