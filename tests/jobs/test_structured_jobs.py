"""Structured output through `prefixbatch run`: spec-level and per-row constraints, their
mistakes, and the summary's count of rows cut before their grammar completed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixbatch.jobs.cli import main
from tests.output_helpers import finished_output

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0,
                                                                                     "maximum": 9}},
          "required": ["answer", "n"], "additionalProperties": False}


def write_job(tmp_path: Path, model: Path, table: pa.Table, **sampling) -> Path:
    pq.write_table(table, tmp_path / "in.parquet")
    spec = {"name": "structured", "input": {"path": "in.parquet", "prompt_column": "prompt"},
            "output": {"path": "out"}, "model": {"path": str(model)}, "sampling": {"max_tokens": 32, **sampling}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return path


def test_spec_schema_and_per_row_constraints(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    table = pa.table({
        "id": ["s1", "s2", "row-regex", "row-choice", "row-schema", "bad-row-schema", "bad-row-regex", "cut"],
        "prompt": [f"Question {i}?" for i in range(8)],
        "regex": [None, None, "[0-9]{3}", None, None, None, "(", None],
        "choice": pa.array([None, None, None, ["red", "green"], None, None, None, None], pa.list_(pa.string())),
        "json_schema": [None, None, None, None, json.dumps({"type": "array", "items": {"type": "boolean"},
                                                             "minItems": 1, "maxItems": 2}),
                        '{"type": "object", "properties": 7}', None, None],
        "max_tokens": [None, None, None, None, None, None, None, 2],
    })
    path = write_job(tmp_path, tiny_llama, table, json_schema=SCHEMA)
    assert main(["run", str(path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    rows = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    for row_id in ("s1", "s2"):
        assert rows[row_id]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(rows[row_id]["output_text"]), SCHEMA)
    # A row's own constraint replaces the spec's schema, whichever kind it is.
    assert rows["row-regex"]["output_text"].isdigit() and len(rows["row-regex"]["output_text"]) == 3
    assert rows["row-choice"]["output_text"] in ("red", "green")
    assert all(isinstance(v, bool) for v in json.loads(rows["row-schema"]["output_text"]))
    assert rows["bad-row-schema"]["error"].startswith("invalid_constraint: json_schema does not compile: ")
    assert rows["bad-row-regex"]["error"].startswith("invalid_constraint: regex does not compile: ")
    assert rows["cut"]["finish_reason"] == "length"
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["constrained_rows_cut_by_max_tokens"] == 1
    assert "1 structured-output rows reached max_tokens" in err


def test_per_row_constraints_without_a_spec_constraint(tmp_path: Path, tiny_llama: Path) -> None:
    table = pa.table({
        "id": ["regex", "choice", "schema", "bad-schema", "not-json", "bad-regex", "free"],
        "prompt": [f"Question {i}?" for i in range(7)],
        "regex": [r"[0-9]{3}", None, None, None, None, "(", None],
        "choice": pa.array([None, ["red", "green"], None, None, None, None, None], pa.list_(pa.string())),
        "json_schema": [None, None, json.dumps({"type": "array", "items": {"type": "boolean"}, "maxItems": 2}),
                        '{"type": "object", "properties": 7}', "{not json", None, None],
    })
    assert main(["run", str(write_job(tmp_path, tiny_llama, table)), "--no-progress"]) == 0
    rows = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    assert rows["regex"]["finish_reason"] == "stop" and len(rows["regex"]["output_text"]) == 3
    assert rows["regex"]["output_text"].isdigit()
    assert rows["choice"]["output_text"] in ("red", "green")
    assert all(isinstance(v, bool) for v in json.loads(rows["schema"]["output_text"]))
    assert rows["bad-schema"]["error"].startswith("invalid_constraint: json_schema does not compile: ")
    assert rows["not-json"]["error"].startswith("invalid_sampling: json_schema: ") and "not valid JSON" in rows["not-json"]["error"]
    assert rows["bad-regex"]["error"].startswith("invalid_constraint: regex does not compile: ")
    assert rows["free"]["error"] is None and rows["free"]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"json_schema": {"type": "object", "properties": 7}}, "sampling.json_schema: json_schema does not compile"),
        ({"regex": "(["}, "sampling.regex: regex does not compile"),
        ({"choice": []}, "must be a non-empty list of non-empty strings"),
        ({"choice": "yes"}, "sampling.choice"),
        ({"choice": [1, 2]}, "sampling.choice"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"regex": "a", "choice": ["a"]}, "at most one of json_schema, regex and choice may be set"),
    ],
)
def test_a_bad_spec_constraint_is_a_job_error(tmp_path: Path, tiny_llama: Path, capsys, sampling, message) -> None:
    table = pa.table({"id": ["a"], "prompt": ["Question?"]})
    path = write_job(tmp_path, tiny_llama, table, **sampling)
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
